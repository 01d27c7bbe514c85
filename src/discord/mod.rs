//! Discord glue on serenity: the gateway connection, message and reaction
//! events, slash and context-menu commands. The decisions and the record
//! live in [`crate::respond`]; this module only translates.
//!
//! - [`handler`]: the `EventHandler` (messages, flags, interactions).
//! - [`commands`]: `/draw`, `/router-stats`, `/reload-router` and the
//!   "Route: image" / "Route: chat" message commands.
//! - [`reply`]: pure text work (splitting, captions, emoji).

pub mod commands;
pub mod handler;
pub mod reply;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serenity::all::{ClientBuilder, CreateAllowedMentions, GatewayIntents, HttpBuilder, UserId};
use tokio_util::task::TaskTracker;

use crate::config::{Secret, Settings, ShardRange};
use crate::respond::Responder;

/// Discord's own API address; any other base is a proxy or a test server.
pub const DISCORD_API: &str = "https://discord.com";

/// Why the bot could not run, in one line for the server owner.
#[derive(Debug, thiserror::Error)]
pub enum DiscordError {
    #[error("DISCORD_TOKEN is not set: create a bot at https://discord.com/developers/applications and put its token in .env")]
    MissingToken,
    #[error("DISCORD_TOKEN is malformed (a bot token has three dot-separated parts)")]
    MalformedToken,
    #[error(
        "Discord rejected DISCORD_TOKEN (invalid or reset): copy the bot's current token into .env"
    )]
    RejectedToken,
    #[error("cannot reach Discord at {base}: {message}")]
    Unreachable { base: String, message: String },
    #[error("Discord refused the Message Content intent: turn it on in the developer portal (Bot > Privileged Gateway Intents)")]
    DisallowedIntents,
    #[error("Discord connection failed: {0}")]
    Gateway(String),
}

/// Shared state of the running bot (serenity's handler holds an `Arc`).
pub struct Bot {
    pub responder: Arc<Responder>,
    pub settings: Settings,
    /// The adapter link to reload from (`model/current`), if any.
    pub adapter_link: Option<PathBuf>,
    /// Where the last registered command set is kept, so that commands are
    /// registered only when they change (Discord limits registrations).
    pub commands_file: PathBuf,
    /// The bot's own user id, known once READY arrives.
    me: OnceLock<UserId>,
    /// Cleared on shutdown: new messages are ignored, in-flight ones finish.
    accepting: AtomicBool,
    /// Every event being handled, so shutdown can wait for them.
    in_flight: TaskTracker,
}

impl Bot {
    pub fn new(
        responder: Arc<Responder>,
        settings: Settings,
        adapter_link: Option<PathBuf>,
        commands_file: PathBuf,
    ) -> Self {
        Self {
            responder,
            settings,
            adapter_link,
            commands_file,
            me: OnceLock::new(),
            accepting: AtomicBool::new(true),
            in_flight: TaskTracker::new(),
        }
    }

    fn me(&self) -> Option<UserId> {
        self.me.get().copied()
    }

    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }
}

/// Connects to Discord and serves until `shutdown` resolves; then stops
/// taking messages, lets those in flight finish (within the grace period)
/// and returns.
pub async fn serve(
    bot: Arc<Bot>,
    token: Option<&Secret>,
    api_base: &str,
    shards: Option<ShardRange>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DiscordError> {
    let token = token.ok_or(DiscordError::MissingToken)?;
    serenity::utils::validate_token(token.expose()).map_err(|_| DiscordError::MalformedToken)?;
    let mut http = HttpBuilder::new(token.expose())
        .default_allowed_mentions(CreateAllowedMentions::new().replied_user(true));
    let base = api_base.trim_end_matches('/');
    if base != DISCORD_API {
        // serenity sends requests to the proxy only with its own rate
        // limiter off; the proxy (or test server) does the limiting.
        http = http.proxy(base).ratelimiter_disabled(true);
    }
    let http = http.build();
    // Checks the token before the gateway does, with a clear answer.
    let me = http
        .get_current_user()
        .await
        .map_err(|e| classify(&e, base))?;
    let _ = bot.me.set(me.id);
    tracing::info!(user = %me.name, id = %me.id, "token accepted");

    let intents = GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT
        | GatewayIntents::GUILD_MESSAGE_REACTIONS;
    let mut client = ClientBuilder::new_with_http(http, intents)
        .event_handler(handler::Handler::new(bot.clone()))
        .await
        .map_err(|e| DiscordError::Gateway(e.to_string()))?;

    let manager = client.shard_manager.clone();
    let stopping = bot.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: no new messages; finishing those in flight");
        stopping.accepting.store(false, Ordering::SeqCst);
        manager.shutdown_all().await;
    });

    let result = match shards {
        Some(r) => client.start_shard_range(r.start..r.end, r.total).await,
        None => client.start_autosharded().await,
    };
    bot.accepting.store(false, Ordering::SeqCst);
    bot.in_flight.close();
    if tokio::time::timeout(bot.settings.shutdown_grace, bot.in_flight.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = bot.in_flight.len(),
            "grace period over; abandoning messages still in flight"
        );
    }
    result.map_err(|e| classify(&e, base))
}

fn classify(e: &serenity::Error, base: &str) -> DiscordError {
    use serenity::all::GatewayError;
    use serenity::http::HttpError;
    match e {
        serenity::Error::Http(HttpError::UnsuccessfulRequest(r))
            if r.status_code.as_u16() == 401 =>
        {
            DiscordError::RejectedToken
        }
        serenity::Error::Http(HttpError::Request(r)) => DiscordError::Unreachable {
            base: base.to_string(),
            message: r.to_string(),
        },
        serenity::Error::Gateway(GatewayError::InvalidAuthentication) => {
            DiscordError::RejectedToken
        }
        serenity::Error::Gateway(GatewayError::DisallowedGatewayIntents) => {
            DiscordError::DisallowedIntents
        }
        other => DiscordError::Gateway(other.to_string()),
    }
}
