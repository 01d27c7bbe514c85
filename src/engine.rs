//! The routing engine: a [`Router`] on its own thread, fed by a queue, so
//! that model work never runs on the async runtime.
//!
//! Requests are served in arrival order. Consecutive routing requests that
//! are waiting are decided together in one batch; an adapter swap waits its
//! turn in the same queue, so every message is decided by the adapter that
//! was live when it arrived. The one exception to the order: a long message
//! is read in chunks, and short messages arriving meanwhile are decided
//! between two of them. Adapters are read and checked off the routing
//! thread (`spawn_blocking`); the routing thread only merges the loaded
//! weights (a few milliseconds on a GPU; under a second on the 2-core dev
//! CPU, Q8_0 copies included).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use crate::lora::Adapter;
use crate::router::{Decision, Router};
use crate::{Error, Result};

/// One routed message.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    pub decision: Decision,
    /// Milliseconds from the start of the engine's batch until this
    /// message's length group was decided (what its caller waited for).
    pub batch_ms: f64,
    /// The adapter directory that decided it (resolved, never a link), if any.
    pub adapter: Option<PathBuf>,
}

/// A request to the engine thread.
enum Request {
    Route {
        text: String,
        reply: oneshot::Sender<Result<Routed>>,
    },
    ExtractPrompt {
        text: String,
        reply: oneshot::Sender<Result<Option<String>>>,
    },
    /// An adapter already loaded (or `None` for the bare base model).
    Swap {
        adapter: Option<Box<Adapter>>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// Handle to the engine thread; cheap to clone, safe to use from async code.
/// The thread stops when the last handle is dropped.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<Request>,
    /// The adapter live now, for status reports (`/router-stats`).
    live: Arc<Mutex<Option<PathBuf>>>,
}

impl Engine {
    /// Moves `router` onto a new thread.
    pub fn spawn(router: Router) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let live = Arc::new(Mutex::new(router.adapter().cloned()));
        let shared = live.clone();
        std::thread::Builder::new()
            .name("router-engine".into())
            .spawn(move || serve(router, rx, shared))
            .map_err(|e| Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(Self { tx, live })
    }

    /// Routes one message.
    pub async fn route(&self, text: String) -> Result<Routed> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Route { text, reply })?;
        rx.await.map_err(|_| Error::EngineStopped)?
    }

    /// The prompt the model writes for `text` when the call is forced (what
    /// the user asked to see); `None` when it writes an empty one.
    pub async fn extract_prompt(&self, text: String) -> Result<Option<String>> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::ExtractPrompt { text, reply })?;
        rx.await.map_err(|_| Error::EngineStopped)?
    }

    /// Loads `adapter` (or none) off the routing thread, then swaps it in
    /// after every message queued before this call. A broken adapter is
    /// refused and the live one keeps serving. Must be called inside a
    /// tokio runtime.
    pub async fn set_adapter(&self, adapter: Option<PathBuf>) -> Result<()> {
        let loaded = match adapter {
            Some(path) => {
                // The resolved directory, so that the record names the
                // version (`model/current` is a link that moves).
                let load = tokio::task::spawn_blocking(move || {
                    let dir = std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))?;
                    Adapter::load(&dir)
                });
                let adapter = load
                    .await
                    .map_err(|e| Error::Engine(format!("adapter loader failed: {e}")))??;
                Some(Box::new(adapter))
            }
            None => None,
        };
        let (reply, rx) = oneshot::channel();
        self.send(Request::Swap {
            adapter: loaded,
            reply,
        })?;
        rx.await.map_err(|_| Error::EngineStopped)?
    }

    /// The adapter deciding messages now.
    pub fn adapter(&self) -> Option<PathBuf> {
        self.live.lock().map(|a| a.clone()).unwrap_or(None)
    }

    fn send(&self, request: Request) -> Result<()> {
        self.tx.send(request).map_err(|_| Error::EngineStopped)
    }
}

/// The engine thread's loop: wait for a request, take whatever else is
/// waiting, serve it all in order, repeat until every handle is gone.
fn serve(mut router: Router, rx: Receiver<Request>, live: Arc<Mutex<Option<PathBuf>>>) {
    warm_up(&mut router);
    let mut queue = VecDeque::new();
    while let Ok(first) = rx.recv() {
        queue.push_back(first);
        queue.extend(rx.try_iter());
        while let Some(request) = queue.pop_front() {
            match request {
                Request::Route { text, reply } => {
                    let mut batch = vec![(text, reply)];
                    while batch.len() < router.config.max_batch.max(1) {
                        match queue.pop_front() {
                            Some(Request::Route { text, reply }) => batch.push((text, reply)),
                            Some(other) => {
                                queue.push_front(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    // Long messages are read in chunks, and the short ones
                    // that arrive meanwhile are decided between two chunks.
                    let (long, short): (Vec<_>, Vec<_>) = batch
                        .into_iter()
                        .partition(|(text, _)| is_long(&router, text));
                    route_batch(&mut router, short);
                    for (text, reply) in long {
                        route_long(&mut router, text, reply, &rx, &mut queue);
                    }
                }
                Request::ExtractPrompt { text, reply } => {
                    let prompt = router
                        .extract_prompts(&[text.as_str()])
                        .map(|mut p| p.pop().flatten());
                    let _ = reply.send(prompt);
                }
                Request::Swap { adapter, reply } => {
                    let result = router.set_adapter(adapter.as_deref());
                    match &result {
                        Ok(()) => {
                            let now = router.adapter().cloned();
                            tracing::info!(adapter = ?now, "adapter swapped in");
                            if let Ok(mut l) = live.lock() {
                                *l = now;
                            }
                            // New weights dropped the captured steps.
                            warm_up(&mut router);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "adapter refused; the previous one keeps serving")
                        }
                    }
                    let _ = reply.send(result);
                }
            }
        }
    }
}

/// Prepares the system prefix and (on CUDA) the replayed step shapes
/// before messages need them; a failure only costs the first messages the
/// time to make them.
fn warm_up(router: &mut Router) {
    let started = Instant::now();
    match router.warm_up() {
        Ok(0) => {}
        Ok(shapes) => tracing::info!(
            shapes,
            ms = started.elapsed().as_millis() as u64,
            "replayed steps ready"
        ),
        Err(e) => tracing::warn!(error = %e, "could not prepare the replayed steps"),
    }
}

/// Decides the waiting messages and answers each caller as soon as its own
/// length group is decided (shortest first), so a long message never holds
/// up the short ones that arrived with it. A failed group fails each of its
/// callers with the same one-line error, and the engine goes on.
fn route_batch(router: &mut Router, batch: Vec<(String, oneshot::Sender<Result<Routed>>)>) {
    let started = Instant::now();
    let adapter = router.adapter().cloned();
    let (texts, replies): (Vec<String>, Vec<_>) = batch.into_iter().unzip();
    let mut replies: Vec<Option<oneshot::Sender<Result<Routed>>>> =
        replies.into_iter().map(Some).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let planned = router.route_groups(&refs, |group, decided| {
        let batch_ms = started.elapsed().as_secs_f64() * 1e3;
        let senders = group.iter().filter_map(|&i| replies[i].take());
        match decided {
            Ok(decisions) => {
                for (decision, reply) in decisions.into_iter().zip(senders) {
                    let _ = reply.send(Ok(Routed {
                        decision,
                        batch_ms,
                        adapter: adapter.clone(),
                    }));
                }
            }
            Err(e) => fail(senders, &e),
        }
    });
    if let Err(e) = planned {
        fail(replies.into_iter().flatten(), &e);
    }
}

fn is_long(router: &Router, text: &str) -> bool {
    router
        .input_ids(text)
        .is_ok_and(|ids| router.is_long(ids.len()))
}

/// Decides a long message chunk by chunk. Between two chunks, the routing
/// requests at the head of the queue whose messages are short are decided
/// at once, so a pasted wall of text never holds up the chat around it by
/// more than one chunk. Anything else (another long message, a prompt
/// request, an adapter swap) waits for it, in order.
fn route_long(
    router: &mut Router,
    text: String,
    reply: oneshot::Sender<Result<Routed>>,
    rx: &Receiver<Request>,
    queue: &mut VecDeque<Request>,
) {
    let started = Instant::now();
    let adapter = router.adapter().cloned();
    let decided = (|| {
        let mut long = router.begin_long(&text)?;
        while !router.advance(&mut long)? {
            queue.extend(rx.try_iter());
            let mut short = Vec::new();
            while let Some(Request::Route { text, .. }) = queue.front() {
                if is_long(router, text) || short.len() >= router.config.max_batch.max(1) {
                    break;
                }
                if let Some(Request::Route { text, reply }) = queue.pop_front() {
                    short.push((text, reply));
                }
            }
            if !short.is_empty() {
                tracing::debug!(
                    waiting = short.len(),
                    long_tokens = long.len(),
                    "short messages decided between two chunks of a long one"
                );
                route_batch(router, short);
            }
        }
        router.finish_long(long)
    })();
    let _ = reply.send(decided.map(|decision| Routed {
        decision,
        batch_ms: started.elapsed().as_secs_f64() * 1e3,
        adapter,
    }));
}

fn fail(replies: impl Iterator<Item = oneshot::Sender<Result<Routed>>>, e: &Error) {
    let msg = e.to_string();
    tracing::error!(error = %msg, "routing batch failed");
    for reply in replies {
        let _ = reply.send(Err(Error::Engine(msg.clone())));
    }
}
