//! Device selection: `cpu`, `cuda`, `cuda:N`, or automatic (CUDA when this
//! build has it and a GPU answers, else CPU).

use candle_core::Device;

use crate::{Error, Result};

/// Parses a device spec; `None` or `"auto"` picks automatically.
pub fn select(spec: Option<&str>) -> Result<Device> {
    let spec = spec
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("auto");
    let err = |message: String| Error::Device {
        requested: spec.to_string(),
        message,
    };
    match spec {
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).map(untracked).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                return Err(err(
                    "this binary was built without CUDA; rebuild with `--features cuda`".into(),
                ));
            }
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .map_err(|_| err(format!("`{n}` is not a GPU number")))?,
                None => 0,
            };
            Device::new_cuda(ordinal)
                .map(untracked)
                .map_err(|e| err(e.to_string()))
        }
        other => Err(err(format!("expected cpu, cuda or cuda:N, got `{other}`"))),
    }
}

/// Turns off cudarc's per-allocation event tracking, which records and
/// waits on CUDA events around every kernel so that tensors can cross
/// streams. candle runs everything of a device on that device's one stream,
/// and this crate creates one device per process, so the events only cost
/// host time (measured in docs/BENCHMARKS.md). Also keeps freed memory in
/// the allocator's pool between steps ([`set_pool_release_threshold`]).
fn untracked(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: all work on this device is queued on its single stream;
        // nothing crosses streams, which is what the events guard against.
        unsafe { d.disable_event_tracking() };
    }
    if device.is_cuda() && !set_pool_release_threshold(&device, u64::MAX) {
        tracing::debug!("could not raise the CUDA memory pool's release threshold");
    }
    device
}

/// Sets how much freed memory the CUDA stream-ordered allocator keeps in its
/// pool (`u64::MAX`: all of it). The driver's default is 0: every
/// synchronisation (each routing step reads its tokens back) hands all freed
/// memory back, and the next step maps it again. Returns whether it was set
/// (never on CPU).
pub fn set_pool_release_threshold(device: &Device, bytes: u64) -> bool {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let dev = d.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = bytes;
        // SAFETY: plain driver calls on the device's own default pool, with
        // pointers to live locals of the types the driver expects.
        return unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, dev) == sys::CUresult::CUDA_SUCCESS
                && sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                ) == sys::CUresult::CUDA_SUCCESS
        };
    }
    let _ = (device, bytes);
    false
}

/// While the returned value lives, CUDA kernel launches on this thread take
/// their dims and strides from a cache keyed by content instead of
/// uploading them at every launch (candle's launch-parameter cache, which
/// also serves host uploads of up to 4 KiB from a cache by content). `None`
/// on other devices. The cache only grows: hold it over work whose shapes
/// repeat (single-token steps, replayed steps). Training steps gain nothing
/// from it (H200: 82.6 against 82.3 ms per step, BENCHMARKS.md).
pub fn cached_launch_params(device: &Device) -> Option<Box<dyn std::any::Any>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return Some(Box::new(d.enable_cuda_graph_htod_cache()));
    }
    let _ = device;
    None
}

/// Short human description (`cpu`, `cuda:0`).
pub fn describe(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}
