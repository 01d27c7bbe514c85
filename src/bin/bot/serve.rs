//! `bot serve` (the default): the Discord bot.

use std::sync::Arc;
use std::time::Duration;

use router::cli::ModelArgs;
use router::config::BotArgs;
use router::discord::{self, Bot};
use tokio_util::sync::CancellationToken;

use crate::app;

pub fn run(model: &ModelArgs, args: &BotArgs) -> anyhow::Result<()> {
    // Fail fast on the token before loading a model.
    let token = args
        .discord_token
        .as_ref()
        .ok_or(discord::DiscordError::MissingToken)?;
    serenity::utils::validate_token(token.expose())
        .map_err(|_| discord::DiscordError::MalformedToken)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("bot")
        .build()?;
    runtime.block_on(async {
        let app = app::start(model, args).await?;
        let stop = CancellationToken::new();
        if let (Some(link), true) = (&app.adapter_link, args.adapter_watch_secs > 0) {
            tokio::spawn(router::adapters::watch(
                app.responder.engine.clone(),
                link.clone(),
                Duration::from_secs(args.adapter_watch_secs),
                stop.clone(),
            ));
        }
        let commands_file = app.settings.router_db.with_extension("commands.json");
        let bot = Arc::new(Bot::new(
            app.responder.clone(),
            app.settings.clone(),
            app.adapter_link.clone(),
            commands_file,
        ));
        let result = discord::serve(
            bot,
            args.discord_token.as_ref(),
            &args.discord_api_base,
            args.shard_range.clone(),
            app::shutdown_signal(),
        )
        .await;
        stop.cancel();
        result?;
        tracing::info!("stopped cleanly");
        Ok(())
    })
}
