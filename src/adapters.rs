//! The adapter in use and the link that names it: `train` promotes a new
//! adapter by moving `model/current`; the running bot notices and swaps it
//! in through the engine, without a restart and without failing a message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::engine::Engine;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// The link points where it did: nothing to do.
    Unchanged(PathBuf),
    /// The adapter it points to now is live.
    Swapped(PathBuf),
}

/// Swaps in the adapter `link` points to now, unless it is already live
/// (`force` reloads it anyway). A missing or broken adapter is refused with
/// a one-line error and the live one keeps serving.
pub async fn reload(engine: &Engine, link: &Path, force: bool) -> crate::Result<Reload> {
    let target = std::fs::canonicalize(link).map_err(|e| crate::Error::io(link, e))?;
    if !force && engine.adapter().as_deref() == Some(target.as_path()) {
        return Ok(Reload::Unchanged(target));
    }
    engine.set_adapter(Some(target.clone())).await?;
    Ok(Reload::Swapped(target))
}

/// Checks `link` every `every` until `stop` is cancelled, swapping in each
/// newly promoted adapter. A target that was refused is not retried until
/// the link moves again, so a broken promotion logs once.
pub async fn watch(
    engine: Engine,
    link: PathBuf,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut refused: Option<PathBuf> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Ok(target) = std::fs::canonicalize(&link) else {
            continue;
        };
        if engine.adapter().as_deref() == Some(target.as_path())
            || refused.as_deref() == Some(target.as_path())
        {
            continue;
        }
        match engine.set_adapter(Some(target.clone())).await {
            Ok(()) => {
                tracing::info!(adapter = %target.display(), "promoted adapter is live");
                refused = None;
            }
            Err(e) => {
                tracing::error!(adapter = %target.display(), error = %e, "promoted adapter refused; keeping the live one");
                refused = Some(target);
            }
        }
    }
}
