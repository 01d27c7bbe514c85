//! Start-up shared by `bot serve` and `bot console`: settings resolved,
//! model and adapter loaded onto the engine thread, backends, record and
//! logs opened. Every failure names what to fix in one line.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use router::backends::chat::ChatBackend;
use router::backends::image::ImageBackend;
use router::cli::ModelArgs;
use router::config::{BotArgs, Settings};
use router::engine::Engine;
use router::feedback::{FeedbackLog, Record, ReportLog};
use router::respond::Responder;
use router::router::RouterConfig;

/// What both modes run on.
pub struct App {
    pub responder: Arc<Responder>,
    pub settings: Settings,
    /// The adapter link to watch for promotions (`model/current`).
    pub adapter_link: Option<PathBuf>,
}

/// Opens everything; model loading runs off the async runtime.
pub async fn start(model: &ModelArgs, args: &BotArgs) -> anyhow::Result<App> {
    let settings = args.resolve(&router::cli::home())?;
    if model.default_base_missing() {
        let fetch = tokio::task::spawn_blocking(router::cli::fetch_default_model);
        fetch.await.context("fetching the default model")??;
    }
    if let Some(p) = &model.adapter {
        anyhow::ensure!(
            p.exists(),
            "adapter not found: {} (ROUTER_ADAPTER)",
            p.display()
        );
    }
    let adapter_link = model.adapter_path()?;
    let loader = model.clone();
    let router = tokio::task::spawn_blocking(move || loader.load_router(RouterConfig::default()))
        .await
        .context("loading the router")?
        .context("loading the router")?;
    let engine = Engine::spawn(router)?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("llm-router-bot/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the HTTP client")?;
    let image = settings
        .image
        .clone()
        .map(|c| ImageBackend::new(client.clone(), c));
    let chat = settings
        .chat
        .clone()
        .map(|c| ChatBackend::new(client.clone(), c));
    let record = Record::open(&settings.router_db).with_context(|| {
        format!(
            "opening the routing record (ROUTER_DB) {}",
            settings.router_db.display()
        )
    })?;
    let feedback = FeedbackLog::open(&settings.feedback_file).with_context(|| {
        format!(
            "opening the feedback file (FEEDBACK_FILE) {}",
            settings.feedback_file.display()
        )
    })?;
    let reports = ReportLog::open(&settings.reports_file).with_context(|| {
        format!(
            "opening the reports file (REPORTS_FILE) {}",
            settings.reports_file.display()
        )
    })?;
    tracing::info!(
        image = settings.image.as_ref().map(|c| format!("{:?} at {}", c.api, c.base_url)).unwrap_or_else(|| "none".into()),
        chat = settings.chat.as_ref().map(|c| c.base_url.clone()).unwrap_or_else(|| "none".into()),
        record = %settings.router_db.display(),
        feedback = %settings.feedback_file.display(),
        "bot ready"
    );
    let responder = Responder::new(
        engine,
        image,
        chat,
        record,
        feedback,
        reports,
        settings.rate_limit_per_minute,
    );
    // Rows a crash left claimed but unwritten go to the file now.
    responder
        .reconcile()
        .await
        .context("writing feedback rows left over from a crash")?;
    Ok(App {
        responder: Arc::new(responder),
        settings,
        adapter_link,
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
