//! Decoder steps replayed from CUDA graphs.
//!
//! On the GPU a routing step of a few rows is bound by kernel launches, not
//! by the weights it reads: eager candle queues several hundred small
//! kernels per step, each with its host-side work (about 8 ms for the 270M
//! model on an H200 against a 0.13 ms weight-read floor). A [`GraphStep`]
//! runs one step shape eagerly once (that run's outputs are the step's),
//! captures the same step as a CUDA graph, and from then on launches the
//! whole graph with one call.
//!
//! A replay runs the captured kernels on the captured addresses, so
//! everything a step reads or writes lives in buffers allocated once: the
//! step's inputs ([`StepInputs`]), the keys and values ([`StaticCache`]),
//! which columns to score, and the logits it writes. Only the contents of
//! those buffers change between replays ([`GraphStep::run`] fills them).
//! Everything the step allocates in between is freed inside the graph.
//!
//! On the CPU (and whenever a capture fails) the same step runs eagerly,
//! so the CPU tests check every buffer and index the GPU replays.
//!
//! [`Replay`] is the capture-and-replay mechanism on its own, for any
//! device work built the same way (a training step, an optimizer update).

use candle_core::{DType, Device, Tensor};

use super::cache::{Batch, StaticCache, StepInputs};
use super::transformer::Decoder;

/// Device work run eagerly once, then captured as a CUDA graph and
/// replayed.
///
/// The work must be a pure function of buffers that outlive it: the same
/// kernels on the same addresses every time, no host reads, no uploads of
/// data (only of launch parameters, which candle's parameter cache serves
/// from the warm-up's copies), and everything it allocates dropped before
/// it returns or kept in those buffers. On the CPU, and after a failed
/// capture (logged once), the work simply runs every time.
pub struct Replay {
    #[cfg(feature = "cuda")]
    graph: Graph,
    /// Where the first run's time went, once it captured.
    capture: Option<CaptureTiming>,
}

/// Host time of a [`Replay`]'s first run on CUDA: the eager warm-up (until
/// its kernels finished), recording the capture, and instantiating and
/// uploading the graph.
#[derive(Debug, Default, Clone, Copy)]
pub struct CaptureTiming {
    pub warm_up: std::time::Duration,
    pub record: std::time::Duration,
    pub instantiate: std::time::Duration,
}

impl CaptureTiming {
    pub fn total(&self) -> std::time::Duration {
        self.warm_up + self.record + self.instantiate
    }
}

impl std::ops::AddAssign for CaptureTiming {
    fn add_assign(&mut self, other: Self) {
        self.warm_up += other.warm_up;
        self.record += other.record;
        self.instantiate += other.instantiate;
    }
}

/// Capture state on CUDA.
#[cfg(feature = "cuda")]
enum Graph {
    /// Not run yet: the first run warms up, then captures.
    Pending,
    Ready(SendGraph),
    /// The capture failed once (logged): the work runs eagerly.
    Eager,
}

/// A captured graph that may move to another thread (the router moves to
/// its engine thread after loading).
#[cfg(feature = "cuda")]
struct SendGraph(candle_core::cuda_backend::cudarc::driver::CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronised, but they may
// be used from any thread as long as calls are serialised; a `Replay` is
// only run through `&mut`, so one thread at a time launches it, and the
// graph holds an `Arc` of the stream it launches on.
#[cfg(feature = "cuda")]
unsafe impl Send for SendGraph {}

/// How many nodes of each kind a captured graph holds: a replayed graph
/// costs a few µs per node in a chain, whatever the node does, so these
/// counts bound what a replay can cost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GraphNodes {
    pub kernels: usize,
    /// Kernel nodes by the kernel's name, most frequent first (a name the
    /// driver cannot give is `?`).
    pub kernel_names: Vec<(String, usize)>,
    pub copies: usize,
    pub sets: usize,
    /// Stream-ordered allocations and frees (candle allocates every
    /// output).
    pub allocs: usize,
    pub frees: usize,
    pub other: usize,
}

impl GraphNodes {
    pub fn total(&self) -> usize {
        self.kernels + self.copies + self.sets + self.allocs + self.frees + self.other
    }
}

impl Default for Replay {
    fn default() -> Self {
        Self::new()
    }
}

impl Replay {
    pub fn new() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            graph: Graph::Pending,
            capture: None,
        }
    }

    /// Where the capturing run's time went (`None` before a capture, and
    /// off CUDA).
    pub fn capture_timing(&self) -> Option<CaptureTiming> {
        self.capture
    }

    /// Whether runs launch a captured graph.
    pub fn is_captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Graph::Ready(_) = self.graph {
            return true;
        }
        false
    }

    /// The captured graph's nodes by kind (`None` before a capture, and
    /// off CUDA).
    pub fn nodes(&self) -> candle_core::Result<Option<GraphNodes>> {
        #[cfg(feature = "cuda")]
        if let Graph::Ready(graph) = &self.graph {
            return count_nodes(&graph.0).map(Some);
        }
        Ok(None)
    }

    /// Runs `body` on `device`: the first time on CUDA eagerly (its results
    /// stand, and it warms the parameter cache up) and then once more as a
    /// capture, which only records; later times by launching the graph.
    /// `what` names the work in the log line of a failed capture.
    pub fn run(
        &mut self,
        device: &Device,
        what: &str,
        body: impl Fn() -> candle_core::Result<()>,
    ) -> candle_core::Result<()> {
        // Kernel dims/strides come from candle's parameter cache, which the
        // eager warm-up fills and a capture requires.
        let _params = crate::device::cached_launch_params(device);
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            match &self.graph {
                Graph::Ready(graph) => {
                    return graph
                        .0
                        .launch()
                        .map_err(|e| candle_core::Error::Msg(format!("CUDA graph launch: {e:?}")));
                }
                Graph::Eager => return body(),
                Graph::Pending => {}
            }
            let started = std::time::Instant::now();
            body()?;
            self.graph = match capture(cuda, &body, started) {
                Ok((graph, timing)) => {
                    self.capture = Some(timing);
                    Graph::Ready(SendGraph(graph))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA graph capture failed; {what} runs eagerly");
                    Graph::Eager
                }
            };
            return Ok(());
        }
        let _ = what;
        body()
    }
}

/// One step shape (rows, width, capacity, scored columns) with its buffers
/// and, on CUDA, its captured graph.
pub struct GraphStep {
    inputs: StepInputs,
    /// Flat indices (`row * width + column`, u32) of the columns whose
    /// logits the step writes, padded with 0 up to the buffer's length.
    scored: Tensor,
    /// `[scored, vocab]` f32, written by every run.
    logits: Tensor,
    replay: Replay,
}

impl GraphStep {
    /// Buffers for steps of `rows` x `width` columns over a static cache of
    /// `capacity` columns, returning the logits of up to `scored` columns.
    pub fn new(
        dec: &Decoder,
        rows: usize,
        width: usize,
        capacity: usize,
        scored: usize,
    ) -> candle_core::Result<Self> {
        if scored == 0 || scored > rows * width {
            candle_core::bail!("a step of {rows}x{width} columns cannot score {scored} of them");
        }
        let dev = &dec.device;
        Ok(Self {
            inputs: dec.step_inputs(rows, width, capacity)?,
            scored: Tensor::zeros(scored, DType::U32, dev)?,
            logits: Tensor::zeros((scored, dec.vocab_size()?), DType::F32, dev)?,
            replay: Replay::new(),
        })
    }

    /// Whether this step replays a captured graph.
    pub fn is_captured(&self) -> bool {
        self.replay.is_captured()
    }

    /// Runs one step: `tokens` (row-major, `rows * width`) at the columns
    /// of `batch` after what `cache` holds, and returns the logits `[n,
    /// vocab]` (f32) of the `n` flat columns in `scored`, in that order.
    /// The caller then records the step with [`StaticCache::advance`].
    pub fn run(
        &mut self,
        dec: &Decoder,
        cache: &StaticCache,
        tokens: &[u32],
        batch: &Batch,
        scored: &[u32],
    ) -> candle_core::Result<Tensor> {
        let (room, columns) = (self.scored.dim(0)?, tokens.len());
        if scored.is_empty() || scored.len() > room {
            candle_core::bail!(
                "a step built to score {room} columns was asked for {}",
                scored.len()
            );
        }
        if let Some(bad) = scored.iter().find(|&&c| c as usize >= columns) {
            candle_core::bail!("scored column {bad} is outside the step's {columns} columns");
        }
        // Fills happen outside the launch-parameter cache and the capture:
        // they upload this step's values into the fixed buffers.
        self.inputs.fill(tokens, batch, cache)?;
        let mut padded = scored.to_vec();
        padded.resize(room, 0);
        let dev = self.scored.device().clone();
        self.scored
            .slice_set(&Tensor::from_vec(padded, room, &dev)?, 0, 0)?;
        let Self {
            inputs,
            scored: columns,
            logits,
            replay,
        } = self;
        replay.run(&dev, "this step shape", || {
            Self::body(dec, cache, inputs, columns, logits)
        })?;
        // A copy: the buffer is overwritten by the next run.
        self.logits.narrow(0, 0, scored.len())?.copy()
    }

    /// The step itself: everything a capture records. Every tensor it
    /// makes is dropped before it returns, so a graph frees what it
    /// allocates.
    fn body(
        dec: &Decoder,
        cache: &StaticCache,
        inputs: &StepInputs,
        scored: &Tensor,
        logits: &Tensor,
    ) -> candle_core::Result<()> {
        let hidden = dec.forward_static(inputs, cache)?;
        let (b, t, h) = hidden.dims3()?;
        let picked = hidden.reshape((b * t, h))?.index_select(scored, 0)?;
        logits.slice_set(&dec.logits(&picked)?, 0, 0)
    }
}

/// Counts `graph`'s nodes by kind.
#[cfg(feature = "cuda")]
fn count_nodes(
    graph: &candle_core::cuda_backend::cudarc::driver::CudaGraph,
) -> candle_core::Result<GraphNodes> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let driver = |e: sys::CUresult| candle_core::Error::Msg(format!("CUDA graph nodes: {e:?}"));
    let g = graph.cu_graph();
    let mut n = 0usize;
    // SAFETY: `g` is the live graph `graph` owns; a null array asks for the
    // count only.
    unsafe { sys::cuGraphGetNodes(g, std::ptr::null_mut(), &mut n) }
        .result()
        .map_err(|e| driver(e.0))?;
    let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); n];
    // SAFETY: `nodes` has room for the `n` nodes asked for.
    unsafe { sys::cuGraphGetNodes(g, nodes.as_mut_ptr(), &mut n) }
        .result()
        .map_err(|e| driver(e.0))?;
    let mut counts = GraphNodes::default();
    let mut names = std::collections::HashMap::<String, usize>::new();
    for node in nodes.into_iter().take(n) {
        let mut kind = std::mem::MaybeUninit::<sys::CUgraphNodeType>::uninit();
        // SAFETY: `node` belongs to the live graph; `kind` is written on
        // success and read only then.
        unsafe { sys::cuGraphNodeGetType(node, kind.as_mut_ptr()) }
            .result()
            .map_err(|e| driver(e.0))?;
        // SAFETY: written by the successful call above.
        match unsafe { kind.assume_init() } {
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => {
                counts.kernels += 1;
                *names.entry(kernel_name(node)).or_default() += 1;
            }
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY => counts.copies += 1,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMSET => counts.sets += 1,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => counts.allocs += 1,
            sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => counts.frees += 1,
            _ => counts.other += 1,
        }
    }
    counts.kernel_names = names.into_iter().collect();
    counts
        .kernel_names
        .sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(counts)
}

/// The name of a kernel node's function, shortened to what precedes its
/// argument list; `?` when the driver cannot say.
#[cfg(feature = "cuda")]
fn kernel_name(node: candle_core::cuda_backend::cudarc::driver::sys::CUgraphNode) -> String {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut params = std::mem::MaybeUninit::<sys::CUDA_KERNEL_NODE_PARAMS>::zeroed();
    // SAFETY: `node` is a kernel node of a live graph; `params` is written
    // on success and read only then.
    let ok = unsafe { sys::cuGraphKernelNodeGetParams_v2(node, params.as_mut_ptr()) }
        .result()
        .is_ok();
    if !ok {
        return "?".into();
    }
    // SAFETY: written by the successful call above.
    let params = unsafe { params.assume_init() };
    // Library kernels (cuBLAS) may come as a `CUkernel`, which the driver
    // accepts wherever a function handle goes.
    let func = if params.func.is_null() {
        params.kern as sys::CUfunction
    } else {
        params.func
    };
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `func` is the node's live function; the driver returns a
    // pointer to a string it owns, copied before anything else runs.
    let ok = !func.is_null()
        && unsafe { sys::cuFuncGetName(&mut name, func) }
            .result()
            .is_ok();
    if !ok || name.is_null() {
        return "?".into();
    }
    // SAFETY: a NUL-terminated string owned by the driver (see above).
    let full = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy();
    full.split('(')
        .next()
        .unwrap_or("?")
        .chars()
        .take(60)
        .collect()
}

/// Records what `body` queues on the device's stream as a graph (relaxed
/// mode: other threads may use CUDA meanwhile) once the work queued so far
/// (the warm-up begun at `started`) finished, and instantiates it. The
/// capture is always ended, so the stream is usable again after a failure.
#[cfg(feature = "cuda")]
fn capture(
    cuda: &candle_core::CudaDevice,
    body: impl FnOnce() -> candle_core::Result<()>,
    started: std::time::Instant,
) -> candle_core::Result<(
    candle_core::cuda_backend::cudarc::driver::CudaGraph,
    CaptureTiming,
)> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = cuda.cuda_stream();
    let driver = |what: &str, e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        candle_core::Error::Msg(format!("CUDA graph {what}: {e:?}"))
    };
    stream.synchronize().map_err(|e| driver("synchronize", e))?;
    let warm = std::time::Instant::now();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| driver("begin capture", e))?;
    let recorded = body();
    let record = std::time::Instant::now();
    // Ends the capture and instantiates the graph.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    recorded?;
    let graph = graph
        .map_err(|e| driver("end capture", e))?
        .ok_or_else(|| candle_core::Error::Msg("CUDA graph capture recorded nothing".into()))?;
    graph.upload().map_err(|e| driver("upload", e))?;
    stream.synchronize().map_err(|e| driver("synchronize", e))?;
    let timing = CaptureTiming {
        warm_up: warm - started,
        record: record - warm,
        instantiate: record.elapsed(),
    };
    Ok((graph, timing))
}
