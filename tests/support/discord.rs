//! A fake Discord for end-to-end tests: the REST API under `/api/v10` and a gateway WebSocket,
//! served by axum on `127.0.0.1:0`, answering with the full object shapes serenity 0.12.5
//! deserializes. The real serenity client runs against it unchanged: point
//! `HttpBuilder::proxy` at [`FakeDiscord::base_url`] with the ratelimiter disabled.
//!
//! Include it from a test file with `#[path = "support/discord.rs"] mod discord;`.
//!
//! # Layout
//! - Configuration: [`FakeConfig`], [`FakeChannel`], [`FakeRole`], [`FakeUser`], [`perms`].
//! - Recorded state: [`FakeState`] and what it holds ([`RecordedRequest`], [`SentMessage`],
//!   [`BotReaction`], [`InteractionResponse`]).
//! - Test-facing API: [`FakeDiscord`] (start, wait, inject gateway events, inspect).
//! - Discord objects: users, members, roles, channels, the guild, messages.
//! - REST: one fallback handler that records every request and routes on path segments.
//! - Gateway: HELLO, IDENTIFY -> READY + GUILD_CREATE, heartbeats, RESUME with replay, dispatch.
//!
//! Like Discord, the fake echoes the bot's own actions back over the gateway (MESSAGE_CREATE for
//! its messages, MESSAGE_REACTION_ADD for its reactions) unless `echo_bot_events` is off, so a
//! bot under test must skip its own events as it would in production.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Discord's epoch (2015-01-01T00:00:00Z) in Unix milliseconds; snowflakes count from it.
const DISCORD_EPOCH_MS: u64 = 1_420_070_400_000;
/// Largest request body accepted (bot uploads are capped at 10 MiB by Discord; leave room).
const BODY_LIMIT: usize = 32 * 1024 * 1024;
/// How long event injectors wait for a live gateway session before panicking.
const LIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// `joined_at` for every member; the value does not matter, its shape does.
const JOINED_AT: &str = "2024-01-01T00:00:00.000000+00:00";

// ===== Configuration ==========================================================================

/// Permission bits (Discord's values) used by the defaults and handy in tests.
pub mod perms {
    pub const ADMINISTRATOR: u64 = 1 << 3;
    pub const ADD_REACTIONS: u64 = 1 << 6;
    pub const VIEW_CHANNEL: u64 = 1 << 10;
    pub const SEND_MESSAGES: u64 = 1 << 11;
    pub const MANAGE_MESSAGES: u64 = 1 << 13;
    pub const EMBED_LINKS: u64 = 1 << 14;
    pub const ATTACH_FILES: u64 = 1 << 15;
    pub const READ_MESSAGE_HISTORY: u64 = 1 << 16;
    pub const USE_EXTERNAL_EMOJIS: u64 = 1 << 18;
    pub const USE_APPLICATION_COMMANDS: u64 = 1 << 31;
    /// What `@everyone` gets by default: enough to read, talk, react, upload and use commands.
    pub const EVERYONE: u64 = VIEW_CHANNEL
        | SEND_MESSAGES
        | ADD_REACTIONS
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | USE_EXTERNAL_EMOJIS
        | USE_APPLICATION_COMMANDS;
}

/// A text channel of the fake guild.
#[derive(Clone, Debug)]
pub struct FakeChannel {
    pub id: u64,
    pub name: String,
}

/// A role of the fake guild besides `@everyone` (whose id is the guild id).
#[derive(Clone, Debug)]
pub struct FakeRole {
    pub id: u64,
    pub name: String,
    /// Discord permission bits, see [`perms`].
    pub permissions: u64,
}

/// A user who talks, reacts or runs commands in tests.
#[derive(Clone, Debug)]
pub struct FakeUser {
    pub id: u64,
    pub name: String,
    pub bot: bool,
    /// Role ids in the fake guild (sent in `member.roles`; `@everyone` is implicit).
    pub roles: Vec<u64>,
}

impl FakeUser {
    /// A human with no roles.
    pub fn new(id: u64, name: &str) -> Self {
        Self {
            id,
            name: name.to_string(),
            bot: false,
            roles: Vec::new(),
        }
    }

    /// The same user holding `roles`.
    pub fn with_roles(mut self, roles: &[u64]) -> Self {
        self.roles = roles.to_vec();
        self
    }
}

/// Everything the fake pretends to be. `Default` gives one guild with two channels and a
/// Moderator role; override fields with struct update syntax.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// The bot token without the `Bot ` prefix; REST and IDENTIFY must carry it.
    pub token: String,
    pub bot_id: u64,
    pub bot_name: String,
    pub application_id: u64,
    pub guild_id: u64,
    pub guild_name: String,
    pub channels: Vec<FakeChannel>,
    pub roles: Vec<FakeRole>,
    /// Permissions of the `@everyone` role.
    pub everyone_permissions: u64,
    /// Roles of the bot's own member.
    pub bot_roles: Vec<u64>,
    /// Sent in HELLO; serenity heartbeats at this pace (it reads the gateway every 500 ms).
    pub heartbeat_interval_ms: u64,
    /// Echo the bot's own messages and reactions back over the gateway, as Discord does.
    pub echo_bot_events: bool,
}

impl FakeConfig {
    pub const GUILD_ID: u64 = 100_000_000_000_000_001;
    pub const GENERAL: u64 = 100_000_000_000_000_101;
    pub const IMAGES: u64 = 100_000_000_000_000_102;
    pub const MODERATOR: u64 = 100_000_000_000_000_201;
    pub const MEMBER: u64 = 100_000_000_000_000_202;
    pub const BOT_ID: u64 = 100_000_000_000_000_010;
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            token: "fake.bot.token-0123456789".to_string(),
            bot_id: Self::BOT_ID,
            bot_name: "router-bot".to_string(),
            application_id: Self::BOT_ID,
            guild_id: Self::GUILD_ID,
            guild_name: "Fake Guild".to_string(),
            channels: vec![
                FakeChannel {
                    id: Self::GENERAL,
                    name: "general".to_string(),
                },
                FakeChannel {
                    id: Self::IMAGES,
                    name: "images".to_string(),
                },
            ],
            roles: vec![
                FakeRole {
                    id: Self::MODERATOR,
                    name: "Moderator".to_string(),
                    permissions: perms::EVERYONE | perms::MANAGE_MESSAGES,
                },
                FakeRole {
                    id: Self::MEMBER,
                    name: "Member".to_string(),
                    permissions: 0,
                },
            ],
            everyone_permissions: perms::EVERYONE,
            bot_roles: Vec::new(),
            heartbeat_interval_ms: 1000,
            echo_bot_events: true,
        }
    }
}

// ===== Recorded state =========================================================================

/// One HTTP request as the fake received it, with the answer it gave.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The full path, e.g. `/api/v10/channels/1/messages`, percent-encoding kept.
    pub path: String,
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The JSON body, or a multipart request's `payload_json`.
    pub json: Option<Value>,
    /// Multipart file parts: (filename, bytes).
    pub files: Vec<(String, Vec<u8>)>,
    pub status: u16,
    pub response: Option<Value>,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A message the bot created through REST (channel messages only; interaction answers are in
/// [`FakeState::interaction_responses`]). PATCHes update it in place.
#[derive(Clone, Debug)]
pub struct SentMessage {
    pub id: u64,
    pub channel_id: u64,
    pub content: String,
    pub reference_message_id: Option<u64>,
    pub files: Vec<(String, Vec<u8>)>,
    pub allowed_mentions: Option<Value>,
    pub edited: bool,
    /// The latest request body (JSON or `payload_json`).
    pub json: Value,
}

/// A reaction the bot currently has on a message (PUT adds, DELETE removes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BotReaction {
    pub channel_id: u64,
    pub message_id: u64,
    /// Unicode emoji, or `name:id` for a custom one, as in the URL.
    pub emoji: String,
}

/// Which interaction endpoint the bot called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseKind {
    /// `POST /interactions/{id}/{token}/callback`.
    Callback,
    /// `PATCH /webhooks/{app}/{token}/messages/@original`.
    EditOriginal,
    /// `POST /webhooks/{app}/{token}`.
    Followup,
}

/// One answer to an interaction.
#[derive(Clone, Debug)]
pub struct InteractionResponse {
    pub kind: ResponseKind,
    /// Known for callbacks; webhook calls only carry the token.
    pub interaction_id: Option<u64>,
    pub token: String,
    pub json: Value,
    pub files: Vec<(String, Vec<u8>)>,
}

/// What an injected interaction is known by.
#[derive(Clone, Debug)]
pub struct FakeInteraction {
    pub id: u64,
    pub token: String,
}

/// Everything the fake has seen and done; [`FakeDiscord::wait_for`] hands it to its closure.
#[derive(Debug, Default)]
pub struct FakeState {
    pub requests: Vec<RecordedRequest>,
    /// `d` of every IDENTIFY (op 2).
    pub identify_payloads: Vec<Value>,
    /// `d` of every RESUME (op 6).
    pub resume_payloads: Vec<Value>,
    /// READY + GUILD_CREATE pairs sent.
    pub readies_sent: usize,
    /// Every dispatch frame (op 0) sent, in order, across sessions.
    pub dispatched: Vec<Value>,
    pub bot_messages: Vec<SentMessage>,
    pub reactions_by_bot: Vec<BotReaction>,
    pub interaction_responses: Vec<InteractionResponse>,
    /// Registered commands: `None` for global, `Some(guild)` for guild commands.
    pub commands: HashMap<Option<u64>, Vec<Value>>,
    config: Arc<FakeConfig>,
    /// The server's port, for attachment URLs.
    port: u16,
    /// Every message the fake knows (users' and the bot's), as Discord objects.
    messages: Vec<Value>,
    attachments: HashMap<u64, Vec<u8>>,
    users: HashMap<u64, FakeUser>,
    /// DM channel id -> the user on the other side.
    dm_channels: HashMap<u64, u64>,
    /// Interaction token -> (interaction id, channel id, original response message id).
    interactions: HashMap<String, (u64, u64, Option<u64>)>,
    last_id: u64,
    gateway: Gateway,
}

/// The gateway session: one live connection at most, and the log a RESUME replays.
#[derive(Debug, Default)]
struct Gateway {
    session: Option<String>,
    sessions_started: u64,
    seq: u64,
    log: Vec<(u64, Value)>,
    live: Option<(u64, mpsc::UnboundedSender<WsMessage>)>,
    connections: u64,
}

impl FakeState {
    /// A fresh snowflake, increasing and roughly "now".
    fn next_id(&mut self) -> u64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_id = (self.last_id + 1).max((now_ms - DISCORD_EPOCH_MS) << 22);
        self.last_id
    }

    fn message(&self, id: u64) -> Option<&Value> {
        self.messages.iter().find(|m| id_of(&m["id"]) == Some(id))
    }

    fn message_mut(&mut self, id: u64) -> Option<&mut Value> {
        self.messages
            .iter_mut()
            .find(|m| id_of(&m["id"]) == Some(id))
    }
}

// ===== Test-facing API ========================================================================

struct Shared {
    config: Arc<FakeConfig>,
    port: u16,
    state: Mutex<FakeState>,
}

/// A running fake Discord. Dropping it stops the server.
pub struct FakeDiscord {
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Drop for FakeDiscord {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeDiscord {
    /// Binds `127.0.0.1:0` and serves REST and the gateway until dropped.
    pub async fn start(config: FakeConfig) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        let config = Arc::new(config);
        let mut state = FakeState {
            config: Arc::clone(&config),
            port,
            ..FakeState::default()
        };
        let bot = FakeUser {
            bot: true,
            roles: config.bot_roles.clone(),
            ..FakeUser::new(config.bot_id, &config.bot_name)
        };
        state.users.insert(bot.id, bot);
        let shared = Arc::new(Shared {
            config,
            port,
            state: Mutex::new(state),
        });
        let app = Router::new()
            .route("/gateway", get(gateway))
            .fallback(rest)
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("fake discord server");
        });
        Self { shared, server }
    }

    /// `http://127.0.0.1:PORT`: what the bot gets as its API base (`HttpBuilder::proxy`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.shared.port)
    }

    /// `ws://127.0.0.1:PORT/gateway`, as `GET /gateway` reports it.
    pub fn gateway_url(&self) -> String {
        format!("ws://127.0.0.1:{}/gateway", self.shared.port)
    }

    pub fn config(&self) -> &FakeConfig {
        &self.shared.config
    }

    /// The bot as a [`FakeUser`].
    pub fn bot_user(&self) -> FakeUser {
        self.state().users[&self.shared.config.bot_id].clone()
    }

    /// Direct access to the recorded state; do not hold it across an await.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.shared
            .state
            .lock()
            .expect("fake discord state poisoned")
    }

    /// Polls `probe` every 5 ms until it returns `Some`; panics after `timeout` with the
    /// requests seen so far, so a missing route or payload is visible.
    pub async fn wait_for<T>(
        &self,
        mut probe: impl FnMut(&FakeState) -> Option<T>,
        timeout: Duration,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = probe(&self.state());
            if let Some(value) = found {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "fake discord: wait_for timed out after {timeout:?}\n{}",
                    self.describe()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until an IDENTIFY was answered with READY and GUILD_CREATE.
    pub async fn wait_ready(&self, timeout: Duration) {
        self.wait_for(
            |s| (s.readies_sent > 0 && s.gateway.live.is_some()).then_some(()),
            timeout,
        )
        .await;
    }

    pub fn identify_payloads(&self) -> Vec<Value> {
        self.state().identify_payloads.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Requests answered 404 because no route matched (or the object was unknown).
    pub fn unhandled_requests(&self) -> Vec<RecordedRequest> {
        self.state()
            .requests
            .iter()
            .filter(|r| r.status == 404)
            .cloned()
            .collect()
    }

    pub fn bot_messages(&self) -> Vec<SentMessage> {
        self.state().bot_messages.clone()
    }

    pub fn reactions_by_bot(&self) -> Vec<BotReaction> {
        self.state().reactions_by_bot.clone()
    }

    pub fn interaction_responses(&self) -> Vec<InteractionResponse> {
        self.state().interaction_responses.clone()
    }

    /// Every dispatch frame sent so far (`{op: 0, s, t, d}`).
    pub fn dispatched(&self) -> Vec<Value> {
        self.state().dispatched.clone()
    }

    /// The DM channel between the bot and `user_id` (created on first use).
    pub fn dm_channel(&self, user_id: u64) -> u64 {
        let mut st = self.state();
        if let Some((&channel, _)) = st.dm_channels.iter().find(|(_, &u)| u == user_id) {
            return channel;
        }
        let channel = st.next_id();
        st.dm_channels.insert(channel, user_id);
        channel
    }

    /// `author` posts `content` in a guild channel: a MESSAGE_CREATE with `guild_id`, the
    /// author's `member` (roles) and mentions parsed from `<@id>`, `<@&id>` and `@everyone`.
    pub async fn user_message(&self, channel_id: u64, author: &FakeUser, content: &str) -> u64 {
        self.user_message_with(channel_id, author, content, &[], None)
            .await
    }

    /// [`Self::user_message`] with attachments (served back at their `url`) and an optional
    /// reply reference.
    pub async fn user_message_with(
        &self,
        channel_id: u64,
        author: &FakeUser,
        content: &str,
        files: &[(&str, &[u8])],
        reply_to: Option<u64>,
    ) -> u64 {
        self.wait_live().await;
        let mut st = self.state();
        st.users.insert(author.id, author.clone());
        let files: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(n, b)| (n.to_string(), b.to_vec()))
            .collect();
        let attachments = store_attachments(&mut st, &files);
        let id = st.next_id();
        let message = message_json(&st, id, channel_id, author, content, attachments, reply_to);
        st.messages.push(message.clone());
        dispatch(&mut st, "MESSAGE_CREATE", message);
        id
    }

    /// `author` writes `content` to the bot in DMs: no `guild_id`, no `member`.
    pub async fn dm_message(&self, author: &FakeUser, content: &str) -> u64 {
        let channel = self.dm_channel(author.id);
        self.user_message(channel, author, content).await
    }

    /// `user` adds `emoji` (unicode) to a message: Discord's MESSAGE_REACTION_ADD with
    /// `member` (roles, user) in guilds, `message_author_id`, `burst` and `type`.
    pub async fn reaction_add(
        &self,
        channel_id: u64,
        message_id: u64,
        user: &FakeUser,
        emoji: &str,
    ) {
        self.wait_live().await;
        let mut st = self.state();
        st.users.insert(user.id, user.clone());
        let event = reaction_json(&st, channel_id, message_id, user, emoji, true);
        dispatch(&mut st, "MESSAGE_REACTION_ADD", event);
    }

    /// `user` removes `emoji`: MESSAGE_REACTION_REMOVE carries no `member` and no
    /// `message_author_id`.
    pub async fn reaction_remove(
        &self,
        channel_id: u64,
        message_id: u64,
        user: &FakeUser,
        emoji: &str,
    ) {
        self.wait_live().await;
        let mut st = self.state();
        let event = reaction_json(&st, channel_id, message_id, user, emoji, false);
        dispatch(&mut st, "MESSAGE_REACTION_REMOVE", event);
    }

    /// `user` runs the slash command `name` with `options` (Discord's shape, see [`option`]).
    pub async fn interaction_command(
        &self,
        channel_id: u64,
        user: &FakeUser,
        name: &str,
        options: Vec<Value>,
    ) -> FakeInteraction {
        let data = json!({"name": name, "type": 1, "options": options});
        self.interaction(channel_id, user, data).await
    }

    /// `user` runs the message context-menu command `name` on `target_message_id`
    /// (`data.type` 3, `target_id`, `resolved.messages`).
    pub async fn interaction_message_command(
        &self,
        channel_id: u64,
        user: &FakeUser,
        name: &str,
        target_message_id: u64,
    ) -> FakeInteraction {
        let target = self
            .state()
            .message(target_message_id)
            .cloned()
            .unwrap_or_else(|| {
                panic!("fake discord: interaction target message {target_message_id} is unknown")
            });
        let data = json!({
            "name": name, "type": 3, "target_id": target_message_id.to_string(),
            "resolved": {"messages": {target_message_id.to_string(): target}},
        });
        self.interaction(channel_id, user, data).await
    }

    async fn interaction(
        &self,
        channel_id: u64,
        user: &FakeUser,
        mut data: Value,
    ) -> FakeInteraction {
        self.wait_live().await;
        let cfg = &self.shared.config;
        let mut st = self.state();
        st.users.insert(user.id, user.clone());
        let id = st.next_id();
        let token = format!("interaction-token-{id}");
        let name = data["name"].as_str().unwrap_or_default().to_string();
        let command_id = st
            .commands
            .values()
            .flatten()
            .find(|c| c["name"] == name.as_str())
            .and_then(|c| id_of(&c["id"]))
            .unwrap_or_else(|| st.next_id());
        data["id"] = json!(command_id.to_string());
        let in_guild = is_guild_channel(cfg, channel_id);
        if in_guild {
            data["guild_id"] = json!(cfg.guild_id.to_string());
        }
        let mut event = json!({
            "id": id.to_string(), "application_id": cfg.application_id.to_string(), "type": 2,
            "data": data, "channel_id": channel_id.to_string(), "token": token, "version": 1,
            "locale": "en-US", "entitlements": [], "attachment_size_limit": 10_485_760,
            "app_permissions": permissions_of(cfg, &cfg.bot_roles).to_string(),
        });
        if in_guild {
            let mut member = member_json(&user_json(user), &user.roles);
            member["permissions"] = json!(permissions_of(cfg, &user.roles).to_string());
            event["guild_id"] = json!(cfg.guild_id.to_string());
            event["guild_locale"] = json!("en-US");
            event["member"] = member;
            event["channel"] = channel_json(&st, channel_id);
            event["authorizing_integration_owners"] = json!({"0": cfg.guild_id.to_string()});
            event["context"] = json!(0);
        } else {
            event["user"] = user_json(user);
            event["channel"] = channel_json(&st, channel_id);
            event["authorizing_integration_owners"] = json!({"0": "0"});
            event["context"] = json!(1);
        }
        st.interactions
            .insert(token.clone(), (id, channel_id, None));
        dispatch(&mut st, "INTERACTION_CREATE", event);
        FakeInteraction { id, token }
    }

    /// Sends any dispatch event (`t`, `d`) on the live session.
    pub async fn dispatch(&self, t: &str, d: Value) {
        self.wait_live().await;
        dispatch(&mut self.state(), t, d);
    }

    /// Closes the live gateway connection with `code` (4000 is resumable), as Discord does on
    /// its side; events injected until the bot resumes are replayed on RESUME.
    pub fn drop_gateway(&self, code: u16) {
        if let Some((_, tx)) = self.state().gateway.live.take() {
            let frame = CloseFrame {
                code,
                reason: "fake discord closed the session".into(),
            };
            let _ = tx.send(WsMessage::Close(Some(frame)));
        }
    }

    async fn wait_live(&self) {
        let live = |s: &FakeState| s.gateway.live.is_some().then_some(());
        self.wait_for(live, LIVE_TIMEOUT).await;
    }

    fn describe(&self) -> String {
        let st = self.state();
        let mut out = format!(
            "identifies: {}, resumes: {}, readies: {}, live: {}\nrequests:\n",
            st.identify_payloads.len(),
            st.resume_payloads.len(),
            st.readies_sent,
            st.gateway.live.is_some()
        );
        for r in &st.requests {
            out += &format!("  {} {} -> {}\n", r.method, r.path, r.status);
        }
        out
    }
}

/// A slash-command option in Discord's shape (`type` 3 is a string, 4 an integer, ...).
pub fn option(name: &str, kind: u8, value: Value) -> Value {
    json!({"name": name, "type": kind, "value": value})
}

// ===== Discord objects ========================================================================

fn id_of(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// The RFC 3339 creation time encoded in a snowflake.
fn timestamp_of(id: u64) -> String {
    let ms = (id >> 22) + DISCORD_EPOCH_MS;
    let ts = serenity::model::Timestamp::from_millis(ms as i64).expect("snowflake timestamp");
    ts.to_rfc3339().unwrap_or_else(|| ts.to_string())
}

fn user_json(user: &FakeUser) -> Value {
    json!({
        "id": user.id.to_string(), "username": user.name, "discriminator": "0",
        "global_name": user.name, "avatar": null, "bot": user.bot, "public_flags": 0, "flags": 0,
    })
}

/// A full guild member (GUILD_CREATE, reactions, interactions, `GET /guilds/{id}/members`).
fn member_json(user: &Value, roles: &[u64]) -> Value {
    let mut member = partial_member_json(roles);
    member["user"] = user.clone();
    member
}

/// The `member` of a MESSAGE_CREATE: a member without `user`.
fn partial_member_json(roles: &[u64]) -> Value {
    let roles: Vec<String> = roles.iter().map(u64::to_string).collect();
    json!({
        "roles": roles, "nick": null, "avatar": null, "banner": null, "joined_at": JOINED_AT,
        "premium_since": null, "deaf": false, "mute": false, "flags": 0, "pending": false,
        "communication_disabled_until": null,
    })
}

fn role_json(id: u64, name: &str, permissions: u64, position: u64) -> Value {
    json!({
        "id": id.to_string(), "name": name, "color": 0,
        "colors": {"primary_color": 0, "secondary_color": null, "tertiary_color": null},
        "hoist": false, "icon": null, "unicode_emoji": null, "position": position,
        "permissions": permissions.to_string(), "managed": false, "mentionable": false,
        "flags": 0, "tags": {},
    })
}

fn roles_json(cfg: &FakeConfig) -> Vec<Value> {
    let mut roles = vec![role_json(
        cfg.guild_id,
        "@everyone",
        cfg.everyone_permissions,
        0,
    )];
    for (i, r) in cfg.roles.iter().enumerate() {
        roles.push(role_json(r.id, &r.name, r.permissions, i as u64 + 1));
    }
    roles
}

/// `@everyone` plus the roles' permissions (no channel overwrites in the fake).
fn permissions_of(cfg: &FakeConfig, roles: &[u64]) -> u64 {
    cfg.roles
        .iter()
        .filter(|r| roles.contains(&r.id))
        .fold(cfg.everyone_permissions, |p, r| p | r.permissions)
}

fn is_guild_channel(cfg: &FakeConfig, channel_id: u64) -> bool {
    cfg.channels.iter().any(|c| c.id == channel_id)
}

/// A guild text channel, or a DM channel with its recipient; `Null` if unknown.
fn channel_json(st: &FakeState, channel_id: u64) -> Value {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    if let Some((position, c)) = cfg
        .channels
        .iter()
        .enumerate()
        .find(|(_, c)| c.id == channel_id)
    {
        return json!({
            "id": c.id.to_string(), "type": 0, "guild_id": cfg.guild_id.to_string(),
            "name": c.name, "position": position, "permission_overwrites": [], "topic": null,
            "nsfw": false, "last_message_id": null, "rate_limit_per_user": 0, "parent_id": null,
            "flags": 0,
        });
    }
    match st
        .dm_channels
        .get(&channel_id)
        .and_then(|u| st.users.get(u))
    {
        Some(user) => json!({
            "id": channel_id.to_string(), "type": 1, "last_message_id": null, "flags": 0,
            "recipients": [user_json(user)],
        }),
        None => Value::Null,
    }
}

fn guild_json(cfg: &FakeConfig) -> Value {
    json!({
        "id": cfg.guild_id.to_string(), "name": cfg.guild_name, "icon": null, "icon_hash": null,
        "splash": null, "discovery_splash": null, "owner_id": "1", "afk_channel_id": null,
        "afk_timeout": 300, "widget_enabled": false, "verification_level": 0,
        "default_message_notifications": 0, "explicit_content_filter": 0, "roles": roles_json(cfg),
        "emojis": [], "features": [], "mfa_level": 0, "application_id": null,
        "system_channel_id": null, "system_channel_flags": 0, "rules_channel_id": null,
        "vanity_url_code": null, "description": null, "banner": null, "premium_tier": 0,
        "premium_subscription_count": 0, "preferred_locale": "en-US",
        "public_updates_channel_id": null, "nsfw_level": 0, "stickers": [],
        "premium_progress_bar_enabled": false, "safety_alerts_channel_id": null,
    })
}

/// GUILD_CREATE: the guild plus channels, and only the bot as member (no privileged intents).
fn guild_create_json(st: &FakeState) -> Value {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    let mut guild = guild_json(cfg);
    let channels: Vec<Value> = cfg
        .channels
        .iter()
        .map(|c| channel_json(st, c.id))
        .collect();
    let bot = user_json(&st.users[&cfg.bot_id]);
    let extra = json!({
        "joined_at": JOINED_AT, "large": false, "unavailable": false, "member_count": 1,
        "voice_states": [], "members": [member_json(&bot, &cfg.bot_roles)], "channels": channels,
        "threads": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        "soundboard_sounds": [], "embedded_activities": [],
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        guild[k] = v.clone();
    }
    guild
}

/// Users `<@id>` / `<@!id>`, roles `<@&id>` named in `content`.
fn parse_mentions(content: &str) -> (Vec<u64>, Vec<u64>) {
    let (mut users, mut roles) = (Vec::new(), Vec::new());
    for piece in content.split("<@").skip(1) {
        let Some(end) = piece.find('>') else { continue };
        let inner = &piece[..end];
        if let Some(role) = inner.strip_prefix('&') {
            roles.extend(role.parse::<u64>().ok());
        } else {
            users.extend(inner.trim_start_matches('!').parse::<u64>().ok());
        }
    }
    (users, roles)
}

fn store_attachments(st: &mut FakeState, files: &[(String, Vec<u8>)]) -> Vec<Value> {
    let port = st.port;
    let mut out = Vec::new();
    for (filename, bytes) in files {
        let id = st.next_id();
        let url = format!("http://127.0.0.1:{port}/attachments/{id}/{filename}");
        let content_type = match filename.rsplit('.').next().unwrap_or_default() {
            "png" => "image/png",
            "jpg" | "jpeg" => "image/jpeg",
            "webp" => "image/webp",
            "gif" => "image/gif",
            "txt" => "text/plain; charset=utf-8",
            "json" => "application/json",
            _ => "application/octet-stream",
        };
        st.attachments.insert(id, bytes.clone());
        out.push(json!({
            "id": id.to_string(), "filename": filename, "size": bytes.len(), "url": url,
            "proxy_url": url, "content_type": content_type, "height": null, "width": null,
        }));
    }
    out
}

/// A full message object, as MESSAGE_CREATE and the REST API carry it.
#[allow(clippy::too_many_arguments)]
fn message_json(
    st: &FakeState,
    id: u64,
    channel_id: u64,
    author: &FakeUser,
    content: &str,
    attachments: Vec<Value>,
    reply_to: Option<u64>,
) -> Value {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    let (user_mentions, role_mentions) = parse_mentions(content);
    let mentions: Vec<Value> = user_mentions
        .iter()
        .map(|id| {
            user_json(
                &st.users
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| FakeUser::new(*id, &format!("user{id}"))),
            )
        })
        .collect();
    let roles: Vec<String> = role_mentions.iter().map(u64::to_string).collect();
    let mut message = json!({
        "id": id.to_string(), "channel_id": channel_id.to_string(), "author": user_json(author),
        "content": content, "timestamp": timestamp_of(id), "edited_timestamp": null, "tts": false,
        "mention_everyone": content.contains("@everyone") || content.contains("@here"),
        "mentions": mentions, "mention_roles": roles, "attachments": attachments, "embeds": [],
        "components": [], "pinned": false, "type": if reply_to.is_some() { 19 } else { 0 },
        "flags": 0,
    });
    if is_guild_channel(cfg, channel_id) {
        message["guild_id"] = json!(cfg.guild_id.to_string());
        message["member"] = partial_member_json(&author.roles);
    }
    if let Some(reference) = reply_to {
        let mut r = json!({"type": 0, "message_id": reference.to_string(), "channel_id": channel_id.to_string()});
        if is_guild_channel(cfg, channel_id) {
            r["guild_id"] = json!(cfg.guild_id.to_string());
        }
        message["message_reference"] = r;
        message["referenced_message"] = st.message(reference).cloned().unwrap_or(Value::Null);
    }
    message
}

fn reaction_json(
    st: &FakeState,
    channel_id: u64,
    message_id: u64,
    user: &FakeUser,
    emoji: &str,
    add: bool,
) -> Value {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    let emoji = match emoji.split_once(':') {
        Some((name, id)) if id.parse::<u64>().is_ok() => json!({"id": id, "name": name}),
        _ => json!({"id": null, "name": emoji}),
    };
    let mut event = json!({
        "user_id": user.id.to_string(), "channel_id": channel_id.to_string(),
        "message_id": message_id.to_string(), "emoji": emoji, "burst": false, "type": 0,
    });
    if is_guild_channel(cfg, channel_id) {
        event["guild_id"] = json!(cfg.guild_id.to_string());
        if add {
            event["member"] = member_json(&user_json(user), &user.roles);
        }
    }
    if add {
        event["burst_colors"] = json!([]);
        if let Some(author) = st
            .message(message_id)
            .and_then(|m| id_of(&m["author"]["id"]))
        {
            event["message_author_id"] = json!(author.to_string());
        }
    }
    event
}

// ===== REST ===================================================================================

/// What a route answers.
enum Reply {
    Json(StatusCode, Value),
    Empty(StatusCode),
    Bytes(Vec<u8>),
}

fn ok(v: Value) -> Reply {
    Reply::Json(StatusCode::OK, v)
}

fn error(status: StatusCode, code: u32, message: &str) -> Reply {
    Reply::Json(status, json!({"message": message, "code": code}))
}

fn not_found(code: u32, what: &str) -> Reply {
    error(StatusCode::NOT_FOUND, code, what)
}

fn parse_id(s: &str) -> Result<u64, Reply> {
    s.parse().map_err(|_| not_found(0, "404: Not Found"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Records every request, then routes it; unknown routes get a Discord-shaped 404.
async fn rest(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    let mut recorded = RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query,
        headers,
        json: None,
        files: Vec::new(),
        status: 0,
        response: None,
    };
    let multipart = recorded
        .header("content-type")
        .is_some_and(|c| c.starts_with("multipart/form-data"));
    let body_result = if multipart {
        read_multipart(Request::from_parts(parts, body), &mut recorded).await
    } else {
        match axum::body::to_bytes(body, BODY_LIMIT).await {
            Ok(bytes) if bytes.is_empty() => Ok(()),
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(|v| recorded.json = Some(v))
                .map_err(|e| format!("body is not JSON: {e}")),
            Err(e) => Err(format!("reading body: {e}")),
        }
    };
    let reply = match body_result {
        Ok(()) => route(&shared, &recorded).unwrap_or_else(|e| e),
        Err(why) => error(StatusCode::BAD_REQUEST, 50035, &why),
    };
    let response = match reply {
        Reply::Json(status, value) => {
            recorded.status = status.as_u16();
            recorded.response = Some(value.clone());
            (status, Json(value)).into_response()
        }
        Reply::Empty(status) => {
            recorded.status = status.as_u16();
            status.into_response()
        }
        Reply::Bytes(bytes) => {
            recorded.status = 200;
            bytes.into_response()
        }
    };
    shared
        .state
        .lock()
        .expect("fake discord state poisoned")
        .requests
        .push(recorded);
    response
}

/// Reads `payload_json` and every file part (`files[n]`, or serenity's single `file`).
async fn read_multipart(req: Request, recorded: &mut RecordedRequest) -> Result<(), String> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| format!("multipart: {e}"))?;
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| format!("multipart field: {e}"))?
    {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| format!("multipart field {name}: {e}"))?;
        match filename {
            Some(filename) => recorded.files.push((filename, bytes.to_vec())),
            None if name == "payload_json" => {
                recorded.json =
                    Some(serde_json::from_slice(&bytes).map_err(|e| format!("payload_json: {e}"))?);
            }
            None => {}
        }
    }
    Ok(())
}

fn route(shared: &Shared, req: &RecordedRequest) -> Result<Reply, Reply> {
    let cfg = &shared.config;
    let mut st = shared.state.lock().expect("fake discord state poisoned");
    if let Some(rest) = req.path.strip_prefix("/attachments/") {
        let id = parse_id(rest.split('/').next().unwrap_or_default())?;
        return st
            .attachments
            .get(&id)
            .map(|b| Reply::Bytes(b.clone()))
            .ok_or_else(|| not_found(0, "404: Not Found"));
    }
    let Some(api) = req.path.strip_prefix("/api/v10/") else {
        return Err(not_found(0, "404: Not Found"));
    };
    if req.header("authorization") != Some(format!("Bot {}", cfg.token).as_str()) {
        return Err(error(StatusCode::UNAUTHORIZED, 0, "401: Unauthorized"));
    }
    let segments: Vec<String> = api.split('/').map(percent_decode).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let body = req.json.clone().unwrap_or_else(|| json!({}));
    let port = shared.port;
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["gateway"]) => Ok(ok(json!({"url": format!("ws://127.0.0.1:{port}/gateway")}))),
        ("GET", ["gateway", "bot"]) => Ok(ok(json!({
            "url": format!("ws://127.0.0.1:{port}/gateway"), "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 14_400_000, "max_concurrency": 1},
        }))),
        ("GET", ["users", "@me"]) => {
            let mut me = user_json(&st.users[&cfg.bot_id]);
            me["verified"] = json!(true);
            me["mfa_enabled"] = json!(false);
            me["email"] = Value::Null;
            Ok(ok(me))
        }
        ("GET", ["oauth2", "applications", "@me"]) => Ok(ok(json!({
            "id": cfg.application_id.to_string(), "name": cfg.bot_name, "icon": null,
            "description": "", "bot_public": true, "bot_require_code_grant": false,
            "verify_key": "0".repeat(64), "team": null, "flags": 0,
            "owner": user_json(&FakeUser::new(1, "owner")), "bot": user_json(&st.users[&cfg.bot_id]),
        }))),
        ("POST", ["channels", cid, "messages"]) => {
            create_message(&mut st, parse_id(cid)?, req, &body)
        }
        ("GET", ["channels", cid, "messages"]) => history(&st, parse_id(cid)?, req),
        ("GET", ["channels", _, "messages", mid]) => st
            .message(parse_id(mid)?)
            .cloned()
            .map(ok)
            .ok_or_else(|| not_found(10008, "Unknown Message")),
        ("PATCH", ["channels", _, "messages", mid]) => {
            edit_message(&mut st, parse_id(mid)?, req, &body)
        }
        ("POST", ["channels", cid, "typing"]) => {
            known_channel(&st, parse_id(cid)?)?;
            Ok(Reply::Empty(StatusCode::NO_CONTENT))
        }
        (
            method @ ("PUT" | "DELETE"),
            ["channels", cid, "messages", mid, "reactions", emoji, "@me"],
        ) => {
            let reaction = BotReaction {
                channel_id: parse_id(cid)?,
                message_id: parse_id(mid)?,
                emoji: emoji.to_string(),
            };
            bot_reaction(&mut st, reaction, method == "PUT")
        }
        ("GET", ["channels", cid]) => match channel_json(&st, parse_id(cid)?) {
            Value::Null => Err(not_found(10003, "Unknown Channel")),
            channel => Ok(ok(channel)),
        },
        ("GET", ["guilds", gid]) if parse_id(gid)? == cfg.guild_id => Ok(ok(guild_json(cfg))),
        ("GET", ["guilds", gid, "roles"]) if parse_id(gid)? == cfg.guild_id => {
            Ok(ok(json!(roles_json(cfg))))
        }
        ("GET", ["guilds", gid, "members", uid]) if parse_id(gid)? == cfg.guild_id => {
            let user = st
                .users
                .get(&parse_id(uid)?)
                .ok_or_else(|| not_found(10007, "Unknown Member"))?;
            Ok(ok(member_json(&user_json(user), &user.roles)))
        }
        ("PUT", ["applications", app, "commands"]) => {
            overwrite_commands(&mut st, parse_id(app)?, None, &body)
        }
        ("PUT", ["applications", app, "guilds", gid, "commands"]) => {
            overwrite_commands(&mut st, parse_id(app)?, Some(parse_id(gid)?), &body)
        }
        ("POST", ["interactions", iid, token, "callback"]) => {
            interaction_callback(&mut st, parse_id(iid)?, token, req, &body)
        }
        ("PATCH", ["webhooks", _, token, "messages", "@original"]) => {
            interaction_message(&mut st, token, ResponseKind::EditOriginal, req, &body)
        }
        ("POST", ["webhooks", _, token]) => {
            interaction_message(&mut st, token, ResponseKind::Followup, req, &body)
        }
        _ => Err(not_found(0, "404: Not Found")),
    }
}

fn known_channel(st: &FakeState, channel_id: u64) -> Result<(), Reply> {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    if is_guild_channel(cfg, channel_id) || st.dm_channels.contains_key(&channel_id) {
        Ok(())
    } else {
        Err(not_found(10003, "Unknown Channel"))
    }
}

/// A message authored by the bot from a create-message body (also used for interaction
/// answers); stored so history and references see it.
fn bot_message(st: &mut FakeState, channel_id: u64, req: &RecordedRequest, body: &Value) -> Value {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    let reply_to = id_of(&body["message_reference"]["message_id"]);
    let attachments = store_attachments(st, &req.files);
    let id = st.next_id();
    let bot = st.users[&cfg.bot_id].clone();
    let content = body["content"].as_str().unwrap_or_default();
    let mut message = message_json(st, id, channel_id, &bot, content, attachments, reply_to);
    message["embeds"] = body.get("embeds").cloned().unwrap_or_else(|| json!([]));
    message["tts"] = json!(body["tts"].as_bool().unwrap_or(false));
    st.messages.push(message.clone());
    message
}

fn create_message(
    st: &mut FakeState,
    channel_id: u64,
    req: &RecordedRequest,
    body: &Value,
) -> Result<Reply, Reply> {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    known_channel(st, channel_id)?;
    if body["content"].as_str().unwrap_or_default().chars().count() > 2000 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            50035,
            "Invalid Form Body (content: Must be 2000 or fewer in length.)",
        ));
    }
    let message = bot_message(st, channel_id, req, body);
    let id = id_of(&message["id"]).unwrap_or_default();
    st.bot_messages.push(SentMessage {
        id,
        channel_id,
        content: body["content"].as_str().unwrap_or_default().to_string(),
        reference_message_id: id_of(&body["message_reference"]["message_id"]),
        files: req.files.clone(),
        allowed_mentions: body.get("allowed_mentions").cloned(),
        edited: false,
        json: body.clone(),
    });
    if cfg.echo_bot_events {
        dispatch(st, "MESSAGE_CREATE", message.clone());
    }
    Ok(ok(message))
}

fn edit_message(
    st: &mut FakeState,
    message_id: u64,
    req: &RecordedRequest,
    body: &Value,
) -> Result<Reply, Reply> {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    let author = st
        .message(message_id)
        .map(|m| id_of(&m["author"]["id"]))
        .ok_or_else(|| not_found(10008, "Unknown Message"))?;
    if author != Some(cfg.bot_id) {
        return Err(error(
            StatusCode::FORBIDDEN,
            50005,
            "Cannot edit a message authored by another user",
        ));
    }
    let added = store_attachments(st, &req.files);
    let edited_at = timestamp_of(st.next_id());
    let message = st.message_mut(message_id).expect("checked above");
    apply_edit(message, body, added, edited_at);
    let message = message.clone();
    // The files the message has now: those kept plus those added.
    let files: Vec<(String, Vec<u8>)> = message["attachments"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let bytes = st.attachments.get(&id_of(&a["id"])?)?.clone();
            Some((
                a["filename"].as_str().unwrap_or_default().to_string(),
                bytes,
            ))
        })
        .collect();
    if let Some(sent) = st.bot_messages.iter_mut().find(|m| m.id == message_id) {
        sent.content = message["content"].as_str().unwrap_or_default().to_string();
        sent.files = files;
        if let Some(allowed) = body.get("allowed_mentions") {
            sent.allowed_mentions = Some(allowed.clone());
        }
        sent.edited = true;
        sent.json = body.clone();
    }
    if cfg.echo_bot_events {
        dispatch(st, "MESSAGE_UPDATE", message.clone());
    }
    Ok(ok(message))
}

/// PATCH semantics: fields present replace; `attachments` lists the old ones to keep.
fn apply_edit(message: &mut Value, body: &Value, added: Vec<Value>, edited_at: String) {
    if let Some(content) = body.get("content") {
        message["content"] = json!(content.as_str().unwrap_or_default());
    }
    if let Some(embeds) = body.get("embeds") {
        message["embeds"] = embeds.clone();
    }
    let mut attachments: Vec<Value> = match body.get("attachments").and_then(Value::as_array) {
        Some(keep) => {
            let keep: Vec<Option<u64>> = keep.iter().map(|a| id_of(&a["id"])).collect();
            let old = message["attachments"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            old.into_iter()
                .filter(|a| keep.contains(&id_of(&a["id"])))
                .collect()
        }
        None => message["attachments"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    };
    attachments.extend(added);
    message["attachments"] = json!(attachments);
    message["edited_timestamp"] = json!(edited_at);
}

/// `GET /channels/{id}/messages`: newest first, `limit` (default 50, max 100), `before`,
/// `after`.
fn history(st: &FakeState, channel_id: u64, req: &RecordedRequest) -> Result<Reply, Reply> {
    let param = |name: &str| {
        req.query
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    let limit = param("limit").unwrap_or(50).clamp(1, 100) as usize;
    let mut found: Vec<&Value> = st
        .messages
        .iter()
        .filter(|m| id_of(&m["channel_id"]) == Some(channel_id))
        .filter(|m| param("before").is_none_or(|b| id_of(&m["id"]).is_some_and(|id| id < b)))
        .filter(|m| param("after").is_none_or(|a| id_of(&m["id"]).is_some_and(|id| id > a)))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(id_of(&m["id"])));
    found.truncate(limit);
    Ok(ok(json!(found)))
}

fn bot_reaction(st: &mut FakeState, reaction: BotReaction, add: bool) -> Result<Reply, Reply> {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    if st.message(reaction.message_id).is_none() {
        return Err(not_found(10008, "Unknown Message"));
    }
    let present = st.reactions_by_bot.contains(&reaction);
    if add && !present {
        st.reactions_by_bot.push(reaction.clone());
    } else if !add {
        st.reactions_by_bot.retain(|r| *r != reaction);
    }
    if cfg.echo_bot_events && add != present {
        let bot = st.users[&cfg.bot_id].clone();
        let event = reaction_json(
            st,
            reaction.channel_id,
            reaction.message_id,
            &bot,
            &reaction.emoji,
            add,
        );
        dispatch(
            st,
            if add {
                "MESSAGE_REACTION_ADD"
            } else {
                "MESSAGE_REACTION_REMOVE"
            },
            event,
        );
    }
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

/// Bulk overwrite: the body's commands replace the scope's; names keep their ids.
fn overwrite_commands(
    st: &mut FakeState,
    app: u64,
    guild: Option<u64>,
    body: &Value,
) -> Result<Reply, Reply> {
    let config = Arc::clone(&st.config);
    let cfg = &*config;
    if app != cfg.application_id {
        return Err(error(StatusCode::FORBIDDEN, 50001, "Missing Access"));
    }
    let old = st.commands.get(&guild).cloned().unwrap_or_default();
    let mut out = Vec::new();
    for command in body.as_array().into_iter().flatten() {
        let name = command["name"].as_str().unwrap_or_default();
        let id = old
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| id_of(&c["id"]))
            .unwrap_or_else(|| st.next_id());
        let mut c = command.clone();
        c["id"] = json!(id.to_string());
        c["application_id"] = json!(app.to_string());
        c["version"] = json!(st.next_id().to_string());
        c["type"] = command.get("type").cloned().unwrap_or(json!(1));
        c["description"] = command.get("description").cloned().unwrap_or(json!(""));
        c["default_member_permissions"] = command
            .get("default_member_permissions")
            .cloned()
            .unwrap_or(Value::Null);
        c["nsfw"] = command.get("nsfw").cloned().unwrap_or(json!(false));
        if let Some(guild) = guild {
            c["guild_id"] = json!(guild.to_string());
        }
        out.push(c);
    }
    st.commands.insert(guild, out.clone());
    Ok(ok(json!(out)))
}

fn interaction_callback(
    st: &mut FakeState,
    id: u64,
    token: &str,
    req: &RecordedRequest,
    body: &Value,
) -> Result<Reply, Reply> {
    let Some(&(known_id, channel_id, original)) = st.interactions.get(token) else {
        return Err(not_found(10062, "Unknown interaction"));
    };
    if known_id != id {
        return Err(not_found(10062, "Unknown interaction"));
    }
    if original.is_some() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            40060,
            "Interaction has already been acknowledged.",
        ));
    }
    st.interaction_responses.push(InteractionResponse {
        kind: ResponseKind::Callback,
        interaction_id: Some(id),
        token: token.to_string(),
        json: body.clone(),
        files: req.files.clone(),
    });
    // Types 4 (message) and 5 (deferred message) create the original response message.
    if matches!(body["type"].as_u64(), Some(4 | 5)) {
        let data = body.get("data").cloned().unwrap_or_else(|| json!({}));
        let message = bot_message(st, channel_id, req, &data);
        let message_id = id_of(&message["id"]);
        st.interactions
            .insert(token.to_string(), (id, channel_id, message_id));
    }
    Ok(Reply::Empty(StatusCode::NO_CONTENT))
}

fn interaction_message(
    st: &mut FakeState,
    token: &str,
    kind: ResponseKind,
    req: &RecordedRequest,
    body: &Value,
) -> Result<Reply, Reply> {
    let Some(&(id, channel_id, original)) = st.interactions.get(token) else {
        return Err(not_found(10015, "Unknown Webhook"));
    };
    st.interaction_responses.push(InteractionResponse {
        kind,
        interaction_id: None,
        token: token.to_string(),
        json: body.clone(),
        files: req.files.clone(),
    });
    if kind == ResponseKind::Followup {
        return Ok(ok(bot_message(st, channel_id, req, body)));
    }
    let original = original.ok_or_else(|| not_found(10008, "Unknown Message"))?;
    let added = store_attachments(st, &req.files);
    let edited_at = timestamp_of(st.next_id());
    let message = st
        .message_mut(original)
        .ok_or_else(|| not_found(10008, "Unknown Message"))?;
    apply_edit(message, body, added, edited_at);
    let message = message.clone();
    st.interactions
        .insert(token.to_string(), (id, channel_id, Some(original)));
    Ok(ok(message))
}

// ===== Gateway ================================================================================

async fn gateway(ws: WebSocketUpgrade, State(shared): State<Arc<Shared>>) -> Response {
    ws.on_upgrade(move |socket| serve_gateway(shared, socket))
}

fn frame(op: u8, d: Value) -> WsMessage {
    WsMessage::Text(
        json!({"op": op, "d": d, "s": null, "t": null})
            .to_string()
            .into(),
    )
}

/// Sends `t` with the next sequence number on the live connection, and logs it for RESUME.
fn dispatch(st: &mut FakeState, t: &str, d: Value) {
    st.gateway.seq += 1;
    let event = json!({"op": 0, "s": st.gateway.seq, "t": t, "d": d});
    st.gateway.log.push((st.gateway.seq, event.clone()));
    st.dispatched.push(event.clone());
    if let Some((_, tx)) = &st.gateway.live {
        let _ = tx.send(WsMessage::Text(event.to_string().into()));
    }
}

/// One connection: HELLO, then ops from the client and frames queued for it, in order.
async fn serve_gateway(shared: Arc<Shared>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<WsMessage>();
    let connection = {
        let mut st = shared.state.lock().expect("fake discord state poisoned");
        st.gateway.connections += 1;
        st.gateway.connections
    };
    let _ = tx.send(frame(
        10,
        json!({"heartbeat_interval": shared.config.heartbeat_interval_ms}),
    ));
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Text(text))) => on_op(&shared, connection, &tx, text.as_str()),
                Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            Some(out) = rx.recv() => {
                let closing = matches!(out, WsMessage::Close(_));
                if socket.send(out).await.is_err() || closing {
                    break;
                }
            }
        }
    }
    let mut st = shared.state.lock().expect("fake discord state poisoned");
    if st
        .gateway
        .live
        .as_ref()
        .is_some_and(|(c, _)| *c == connection)
    {
        st.gateway.live = None;
    }
}

fn on_op(shared: &Shared, connection: u64, tx: &mpsc::UnboundedSender<WsMessage>, text: &str) {
    let Ok(payload) = serde_json::from_str::<Value>(text) else {
        let _ = tx.send(WsMessage::Close(Some(CloseFrame {
            code: 4002,
            reason: "Decode error".into(),
        })));
        return;
    };
    let cfg = &shared.config;
    let mut st = shared.state.lock().expect("fake discord state poisoned");
    let d = payload["d"].clone();
    let token_ok = d["token"]
        .as_str()
        .map(|t| t.strip_prefix("Bot ").unwrap_or(t))
        == Some(cfg.token.as_str());
    match payload["op"].as_u64() {
        Some(1) => {
            let _ = tx.send(frame(11, Value::Null));
        }
        Some(2) => {
            st.identify_payloads.push(d.clone());
            if !token_ok {
                let _ = tx.send(WsMessage::Close(Some(CloseFrame {
                    code: 4004,
                    reason: "Authentication failed.".into(),
                })));
                return;
            }
            st.gateway.sessions_started += 1;
            let session = format!("fake-session-{}", st.gateway.sessions_started);
            st.gateway.session = Some(session.clone());
            st.gateway.seq = 0;
            st.gateway.log.clear();
            st.gateway.live = Some((connection, tx.clone()));
            let mut user = user_json(&st.users[&cfg.bot_id]);
            user["verified"] = json!(true);
            user["mfa_enabled"] = json!(false);
            let ready = json!({
                "v": 10, "user": user, "guilds": [{"id": cfg.guild_id.to_string(), "unavailable": true}],
                "session_id": session, "resume_gateway_url": format!("ws://127.0.0.1:{}/gateway", shared.port),
                "shard": d.get("shard").cloned().unwrap_or(json!([0, 1])),
                "application": {"id": cfg.application_id.to_string(), "flags": 0},
                "private_channels": [], "relationships": [], "presences": [], "user_settings": {},
                "guild_join_requests": [], "geo_ordered_rtc_regions": [], "_trace": ["fake-discord"],
            });
            dispatch(&mut st, "READY", ready);
            let guild = guild_create_json(&st);
            dispatch(&mut st, "GUILD_CREATE", guild);
            st.readies_sent += 1;
        }
        Some(6) => {
            st.resume_payloads.push(d.clone());
            let same_session = st.gateway.session.is_some()
                && d["session_id"].as_str() == st.gateway.session.as_deref();
            if !token_ok || !same_session {
                let _ = tx.send(frame(9, json!(false)));
                return;
            }
            let after = d["seq"].as_u64().unwrap_or(0);
            for (_, event) in st.gateway.log.iter().filter(|(s, _)| *s > after) {
                let _ = tx.send(WsMessage::Text(event.to_string().into()));
            }
            st.gateway.live = Some((connection, tx.clone()));
            dispatch(&mut st, "RESUMED", json!({"_trace": ["fake-discord"]}));
        }
        // Presence updates (3), member requests (8) and the rest are accepted and ignored.
        _ => {}
    }
}
