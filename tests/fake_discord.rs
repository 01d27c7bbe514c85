//! The fake Discord (`tests/support/discord.rs`) against the real serenity client: a minimal
//! bot connects through REST and the gateway, and each test drives it with injected events and
//! checks what reached the handler and what the fake recorded.

#![cfg(feature = "bot")]

#[path = "support/discord.rs"]
mod discord;

use std::sync::Arc;
use std::time::Duration;

use discord::{option, FakeConfig, FakeDiscord, FakeUser, ResponseKind};
use serde_json::{json, Value};
use serenity::all::{
    ClientBuilder, Command, CommandOptionType, CommandType, Context, CreateAllowedMentions,
    CreateAttachment, CreateCommand, CreateCommandOption, CreateInteractionResponse,
    CreateInteractionResponseFollowup, CreateInteractionResponseMessage, CreateMessage,
    EditInteractionResponse, EditMessage, EventHandler, GatewayIntents, GetMessages, HttpBuilder,
    Interaction, Message, Reaction, Ready, ShardManager,
};
use serenity::async_trait;
use serenity::model::event::GatewayEvent;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(5);
const FILE_BYTES: &[u8] = b"\x89PNG fake image bytes \x00\x01\x02";

/// What the handler saw, reported to the test.
#[derive(Clone, Debug)]
enum Seen {
    Ready {
        user: String,
        guilds: usize,
    },
    Message {
        id: u64,
        content: String,
        bot: bool,
        guild: bool,
        roles: Vec<u64>,
    },
    ReactionAdd {
        user: u64,
        emoji: String,
        member_roles: Option<Vec<u64>>,
        message_author: Option<u64>,
    },
    ReactionRemove {
        user: u64,
        emoji: String,
        has_member: bool,
    },
    Command {
        name: String,
        target: Option<u64>,
    },
    Failed(String),
}

/// A minimal bot: thin glue that reports everything and answers a few commands.
struct Handler {
    seen: mpsc::UnboundedSender<Seen>,
}

impl Handler {
    fn report(&self, seen: Seen) {
        let _ = self.seen.send(seen);
    }

    async fn on_message(&self, ctx: &Context, msg: &Message) -> serenity::Result<()> {
        let reply = CreateMessage::new()
            .reference_message(msg)
            .allowed_mentions(CreateAllowedMentions::new().replied_user(true));
        match msg.content.as_str() {
            "ping" => {
                msg.channel_id.broadcast_typing(&ctx.http).await?;
                msg.channel_id
                    .send_message(&ctx.http, reply.content("pong"))
                    .await?;
            }
            "file" => {
                let file = CreateAttachment::bytes(FILE_BYTES, "picture.png");
                msg.channel_id
                    .send_message(&ctx.http, reply.content("here").add_file(file))
                    .await?;
            }
            "history" => {
                let history = msg
                    .channel_id
                    .messages(&ctx.http, GetMessages::new().limit(10))
                    .await?;
                let joined: Vec<&str> = history.iter().map(|m| m.content.as_str()).collect();
                msg.channel_id
                    .send_message(&ctx.http, reply.content(joined.join("|")))
                    .await?;
            }
            "edit" => {
                let mut draft = msg
                    .channel_id
                    .send_message(&ctx.http, reply.content("draft"))
                    .await?;
                draft
                    .edit(&ctx.http, EditMessage::new().content("final"))
                    .await?;
            }
            "pins" => drop(msg.channel_id.pins(&ctx.http).await?),
            "lookups" => {
                // Every read a bot does at runtime, deserialized into serenity's models.
                let guild_id = msg.guild_id.expect("guild message");
                let me = ctx.http.get_current_user().await?;
                let app = ctx.http.get_current_application_info().await?;
                let guild = ctx.http.get_guild(guild_id).await?;
                let roles = ctx.http.get_guild_roles(guild_id).await?;
                let member = ctx.http.get_member(guild_id, msg.author.id).await?;
                let channel = ctx.http.get_channel(msg.channel_id).await?;
                let again = ctx.http.get_message(msg.channel_id, msg.id).await?;
                let summary = format!(
                    "{} {} {} {} {} {} {}",
                    me.name,
                    app.id,
                    guild.name,
                    roles.len(),
                    member.roles.len(),
                    channel.id(),
                    again.content
                );
                msg.channel_id
                    .send_message(&ctx.http, reply.content(summary))
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }

    async fn on_command(&self, ctx: &Context, interaction: &Interaction) -> serenity::Result<()> {
        let Interaction::Command(cmd) = interaction else {
            return Ok(());
        };
        let target = cmd.data.target_id.map(|t| t.get());
        self.report(Seen::Command {
            name: cmd.data.name.clone(),
            target,
        });
        let content = match cmd.data.kind {
            CommandType::Message => cmd
                .data
                .resolved
                .messages
                .values()
                .map(|m| m.content.clone())
                .collect(),
            _ => format!(
                "asked: {}",
                cmd.data
                    .options
                    .first()
                    .and_then(|o| o.value.as_str())
                    .unwrap_or("")
            ),
        };
        let message = CreateInteractionResponseMessage::new()
            .content(content)
            .ephemeral(true);
        cmd.create_response(&ctx.http, CreateInteractionResponse::Message(message))
            .await?;
        if cmd.data.kind == CommandType::ChatInput {
            cmd.edit_response(&ctx.http, EditInteractionResponse::new().content("edited"))
                .await?;
            cmd.create_followup(
                &ctx.http,
                CreateInteractionResponseFollowup::new().content("more"),
            )
            .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let commands = vec![
            CreateCommand::new("ask")
                .description("Ask the bot")
                .add_option(
                    CreateCommandOption::new(CommandOptionType::String, "question", "What")
                        .required(true),
                ),
            CreateCommand::new("Flag").kind(CommandType::Message),
        ];
        if let Err(why) = Command::set_global_commands(&ctx.http, commands).await {
            self.report(Seen::Failed(format!("register: {why}")));
        }
        self.report(Seen::Ready {
            user: ready.user.name.clone(),
            guilds: ready.guilds.len(),
        });
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let roles = msg
            .member
            .as_ref()
            .map(|m| m.roles.iter().map(|r| r.get()).collect())
            .unwrap_or_default();
        self.report(Seen::Message {
            id: msg.id.get(),
            content: msg.content.clone(),
            bot: msg.author.bot,
            guild: msg.guild_id.is_some(),
            roles,
        });
        if msg.author.bot {
            return;
        }
        if let Err(why) = self.on_message(&ctx, &msg).await {
            self.report(Seen::Failed(format!("{}: {why}", msg.content)));
        }
    }

    async fn reaction_add(&self, ctx: Context, reaction: Reaction) {
        let user = reaction.user_id.map(|u| u.get()).unwrap_or_default();
        self.report(Seen::ReactionAdd {
            user,
            emoji: reaction.emoji.to_string(),
            member_roles: reaction
                .member
                .as_ref()
                .map(|m| m.roles.iter().map(|r| r.get()).collect()),
            message_author: reaction.message_author_id.map(|u| u.get()),
        });
        if user != ctx.cache.current_user().id.get() {
            if let Err(why) = reaction
                .channel_id
                .create_reaction(&ctx.http, reaction.message_id, '👀')
                .await
            {
                self.report(Seen::Failed(format!("react: {why}")));
            }
        }
    }

    async fn reaction_remove(&self, ctx: Context, reaction: Reaction) {
        let user = reaction.user_id.map(|u| u.get()).unwrap_or_default();
        self.report(Seen::ReactionRemove {
            user,
            emoji: reaction.emoji.to_string(),
            has_member: reaction.member.is_some(),
        });
        if user != ctx.cache.current_user().id.get() {
            let removed = reaction
                .channel_id
                .delete_reaction(&ctx.http, reaction.message_id, None, '👀')
                .await;
            if let Err(why) = removed {
                self.report(Seen::Failed(format!("unreact: {why}")));
            }
        }
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        if let Err(why) = self.on_command(&ctx, &interaction).await {
            self.report(Seen::Failed(format!("interaction: {why}")));
        }
    }
}

/// The fake plus a real serenity client connected to it.
struct Harness {
    fake: FakeDiscord,
    seen: mpsc::UnboundedReceiver<Seen>,
    shards: Arc<ShardManager>,
    client: tokio::task::JoinHandle<serenity::Result<()>>,
}

impl Harness {
    /// Starts the fake and the bot, and waits until the handler got READY.
    async fn start() -> Self {
        let fake = FakeDiscord::start(FakeConfig::default()).await;
        let http = HttpBuilder::new(&fake.config().token)
            .proxy(fake.base_url())
            .ratelimiter_disabled(true)
            .build();
        let intents = GatewayIntents::GUILDS
            | GatewayIntents::GUILD_MESSAGES
            | GatewayIntents::GUILD_MESSAGE_REACTIONS
            | GatewayIntents::DIRECT_MESSAGES
            | GatewayIntents::MESSAGE_CONTENT;
        let (tx, seen) = mpsc::unbounded_channel();
        let mut client = ClientBuilder::new_with_http(http, intents)
            .event_handler(Handler { seen: tx })
            .await
            .expect("serenity client");
        let shards = Arc::clone(&client.shard_manager);
        let client = tokio::spawn(async move { client.start().await });
        let mut harness = Self {
            fake,
            seen,
            shards,
            client,
        };
        let ready = harness.expect(|s| matches!(s, Seen::Ready { .. })).await;
        let Seen::Ready { user, guilds } = ready else {
            unreachable!()
        };
        assert_eq!(
            (user.as_str(), guilds),
            (harness.fake.config().bot_name.as_str(), 1)
        );
        harness.fake.wait_ready(WAIT).await;
        harness
    }

    /// The next report matching `want`, skipping others; fails on a handler error.
    async fn expect(&mut self, want: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.seen.recv()).await;
            match next {
                Ok(Some(Seen::Failed(why))) => panic!("handler failed: {why}"),
                Ok(Some(seen)) if want(&seen) => return seen,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!(
                    "no matching handler report within {WAIT:?}; fake saw {:#?}",
                    self.paths()
                ),
            }
        }
    }

    fn paths(&self) -> Vec<String> {
        self.fake
            .requests()
            .iter()
            .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
            .collect()
    }

    /// Shuts the shards down, checks the client returns, and checks every frame the fake sent
    /// deserializes as serenity's `GatewayEvent` (serenity drops bad ones silently).
    async fn stop(self) {
        self.shards.shutdown_all().await;
        let ended = tokio::time::timeout(WAIT, self.client).await;
        assert!(
            matches!(ended, Ok(Ok(Ok(())))),
            "client did not stop cleanly: {ended:?}"
        );
        for frame in self.fake.dispatched() {
            let parsed = serde_json::from_value::<GatewayEvent>(frame.clone());
            assert!(
                parsed.is_ok(),
                "serenity rejects {}: {:?}",
                frame["t"],
                parsed.err()
            );
        }
    }
}

fn alice() -> FakeUser {
    FakeUser::new(500_000_000_000_000_001, "alice").with_roles(&[FakeConfig::MEMBER])
}

fn moderator() -> FakeUser {
    FakeUser::new(500_000_000_000_000_002, "mod").with_roles(&[FakeConfig::MODERATOR])
}

#[tokio::test]
async fn ready_identify_and_token_only_in_auth() {
    let h = Harness::start().await;
    let identify = &h.fake.identify_payloads()[0];
    let token = h.fake.config().token.clone();
    assert_eq!(
        identify["token"]
            .as_str()
            .map(|t| t.trim_start_matches("Bot ")),
        Some(token.as_str())
    );
    assert_eq!(identify["shard"], json!([0, 1]));
    let intents = GatewayIntents::GUILDS
        | GatewayIntents::GUILD_MESSAGES
        | GatewayIntents::GUILD_MESSAGE_REACTIONS
        | GatewayIntents::DIRECT_MESSAGES
        | GatewayIntents::MESSAGE_CONTENT;
    assert_eq!(identify["intents"].as_u64(), Some(intents.bits()));

    h.fake
        .user_message(FakeConfig::GENERAL, &alice(), "lookups")
        .await;
    let cfg = h.fake.config().clone();
    let summary = format!(
        "{} {} {} 3 1 {} lookups",
        cfg.bot_name,
        cfg.application_id,
        cfg.guild_name,
        FakeConfig::GENERAL
    );
    let expect_summary = |s: &discord::FakeState| {
        s.bot_messages
            .iter()
            .find(|m| m.content == summary)
            .map(|_| ())
    };
    h.fake.wait_for(expect_summary, WAIT).await;

    let registered = h
        .fake
        .wait_for(|s| s.commands.get(&None).cloned(), WAIT)
        .await;
    let names: Vec<&str> = registered
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["ask", "Flag"]);
    assert!(registered.iter().all(|c| c["id"].is_string()));

    let requests = h.fake.requests();
    assert!(
        requests.iter().any(|r| r.path == "/api/v10/gateway"),
        "serenity asks for the gateway URL"
    );
    for r in &requests {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bot {token}").as_str()),
            "{} {}",
            r.method,
            r.path
        );
        let elsewhere = format!("{:?} {:?} {:?}", r.path, r.query, r.json);
        assert!(
            !elsewhere.contains(&token),
            "token leaked in {} {}",
            r.method,
            r.path
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn ping_gets_a_referenced_pong_and_history_is_newest_first() {
    let mut h = Harness::start().await;
    let ping = h
        .fake
        .user_message(FakeConfig::GENERAL, &alice(), "ping")
        .await;
    let seen = h
        .expect(|s| matches!(s, Seen::Message { content, .. } if content == "ping"))
        .await;
    let Seen::Message {
        id, guild, roles, ..
    } = seen
    else {
        unreachable!()
    };
    assert_eq!((id, guild, roles), (ping, true, vec![FakeConfig::MEMBER]));

    let pong = h
        .fake
        .wait_for(
            |s| s.bot_messages.iter().find(|m| m.content == "pong").cloned(),
            WAIT,
        )
        .await;
    assert_eq!(pong.channel_id, FakeConfig::GENERAL);
    assert_eq!(pong.reference_message_id, Some(ping));
    let allowed = pong.allowed_mentions.expect("allowed_mentions sent");
    assert_eq!(allowed["replied_user"], json!(true));
    assert!(
        allowed["parse"].as_array().is_none_or(Vec::is_empty),
        "no mass mentions: {allowed}"
    );
    assert!(h
        .fake
        .requests()
        .iter()
        .any(|r| r.method == "POST" && r.path.ends_with("/typing")));
    // Discord echoes the bot's own message; the handler sees it as a bot message.
    h.expect(|s| matches!(s, Seen::Message { content, bot: true, .. } if content == "pong"))
        .await;

    h.fake
        .user_message(FakeConfig::GENERAL, &alice(), "history")
        .await;
    let listing = h
        .fake
        .wait_for(
            |s| {
                s.bot_messages
                    .iter()
                    .find(|m| m.content.starts_with("history"))
                    .cloned()
            },
            WAIT,
        )
        .await;
    assert_eq!(listing.content, "history|pong|ping");

    let dm = h.fake.dm_message(&alice(), "ping").await;
    let seen = h
        .expect(|s| matches!(s, Seen::Message { id, .. } if *id == dm))
        .await;
    assert!(matches!(seen, Seen::Message { guild: false, .. }));
    let channel = h.fake.dm_channel(alice().id);
    h.fake
        .wait_for(
            |s| {
                s.bot_messages
                    .iter()
                    .find(|m| m.channel_id == channel && m.content == "pong")
                    .map(|_| ())
            },
            WAIT,
        )
        .await;
    h.stop().await;
}

#[tokio::test]
async fn uploads_arrive_as_multipart_and_edits_update_the_message() {
    let h = Harness::start().await;
    h.fake
        .user_message(FakeConfig::IMAGES, &alice(), "file")
        .await;
    let sent = h
        .fake
        .wait_for(
            |s| s.bot_messages.iter().find(|m| m.content == "here").cloned(),
            WAIT,
        )
        .await;
    assert_eq!(
        sent.files,
        vec![("picture.png".to_string(), FILE_BYTES.to_vec())]
    );
    let request = h
        .fake
        .requests()
        .into_iter()
        .find(|r| !r.files.is_empty())
        .expect("upload request");
    assert!(request
        .header("content-type")
        .is_some_and(|c| c.starts_with("multipart/form-data")));
    assert_eq!(
        request.json.as_ref().map(|j| j["content"].clone()),
        Some(json!("here"))
    );
    let attachment = &request.response.as_ref().expect("message returned")["attachments"][0];
    assert_eq!(attachment["filename"], json!("picture.png"));
    assert_eq!(attachment["size"], json!(FILE_BYTES.len()));

    h.fake
        .user_message(FakeConfig::IMAGES, &alice(), "edit")
        .await;
    let edited = h
        .fake
        .wait_for(|s| s.bot_messages.iter().find(|m| m.edited).cloned(), WAIT)
        .await;
    assert_eq!(edited.content, "final");
    h.stop().await;
}

#[tokio::test]
async fn reactions_carry_member_roles_on_add_only() {
    let mut h = Harness::start().await;
    let author = alice();
    let message = h
        .fake
        .user_message(FakeConfig::GENERAL, &author, "an image")
        .await;
    let modr = moderator();
    h.fake
        .reaction_add(FakeConfig::GENERAL, message, &modr, "👍")
        .await;
    let seen = h
        .expect(|s| matches!(s, Seen::ReactionAdd { user, .. } if *user == modr.id))
        .await;
    let Seen::ReactionAdd {
        emoji,
        member_roles,
        message_author,
        ..
    } = seen
    else {
        unreachable!()
    };
    assert_eq!(emoji, "👍");
    assert_eq!(member_roles, Some(vec![FakeConfig::MODERATOR]));
    assert_eq!(message_author, Some(author.id));

    // The bot reacts back, and Discord echoes the bot's own reaction to it.
    let bot = h.fake.config().bot_id;
    h.expect(|s| matches!(s, Seen::ReactionAdd { user, .. } if *user == bot))
        .await;
    let reactions = h.fake.reactions_by_bot();
    assert_eq!(
        (
            reactions.len(),
            reactions[0].message_id,
            reactions[0].emoji.as_str()
        ),
        (1, message, "👀")
    );

    h.fake
        .reaction_remove(FakeConfig::GENERAL, message, &modr, "👍")
        .await;
    let seen = h
        .expect(|s| matches!(s, Seen::ReactionRemove { user, .. } if *user == modr.id))
        .await;
    assert!(
        matches!(seen, Seen::ReactionRemove { has_member: false, ref emoji, .. } if emoji == "👍")
    );
    h.fake
        .wait_for(|s| s.reactions_by_bot.is_empty().then_some(()), WAIT)
        .await;
    h.stop().await;
}

#[tokio::test]
async fn slash_and_message_commands_are_answered() {
    let mut h = Harness::start().await;
    h.fake
        .wait_for(|s| s.commands.get(&None).map(|_| ()), WAIT)
        .await;
    let ask = h
        .fake
        .interaction_command(
            FakeConfig::GENERAL,
            &alice(),
            "ask",
            vec![option("question", 3, json!("why"))],
        )
        .await;
    h.expect(|s| matches!(s, Seen::Command { name, .. } if name == "ask"))
        .await;
    let answers = h
        .fake
        .wait_for(
            |s| (s.interaction_responses.len() >= 3).then(|| s.interaction_responses.clone()),
            WAIT,
        )
        .await;
    let kinds: Vec<ResponseKind> = answers.iter().map(|a| a.kind).collect();
    assert_eq!(
        kinds,
        [
            ResponseKind::Callback,
            ResponseKind::EditOriginal,
            ResponseKind::Followup
        ]
    );
    assert!(answers.iter().all(|a| a.token == ask.token));
    assert_eq!(answers[0].interaction_id, Some(ask.id));
    assert_eq!(answers[0].json["type"], json!(4));
    assert_eq!(answers[0].json["data"]["content"], json!("asked: why"));
    assert_eq!(answers[0].json["data"]["flags"], json!(64), "ephemeral");
    assert_eq!(answers[1].json["content"], json!("edited"));
    assert_eq!(answers[2].json["content"], json!("more"));

    let target = h
        .fake
        .user_message(FakeConfig::GENERAL, &alice(), "flag me")
        .await;
    h.fake
        .interaction_message_command(FakeConfig::GENERAL, &moderator(), "Flag", target)
        .await;
    let seen = h
        .expect(|s| matches!(s, Seen::Command { name, .. } if name == "Flag"))
        .await;
    assert!(matches!(seen, Seen::Command { target: Some(t), .. } if t == target));
    let answer = h
        .fake
        .wait_for(|s| s.interaction_responses.get(3).cloned(), WAIT)
        .await;
    assert_eq!(answer.json["data"]["content"], json!("flag me"));
    h.stop().await;
}

#[tokio::test]
async fn dropped_gateway_resumes_and_replays() {
    let mut h = Harness::start().await;
    h.fake.drop_gateway(4000);
    h.fake
        .wait_for(|s| (!s.resume_payloads.is_empty()).then_some(()), WAIT)
        .await;
    h.fake
        .user_message(FakeConfig::GENERAL, &alice(), "ping")
        .await;
    h.fake
        .wait_for(
            |s| {
                s.bot_messages
                    .iter()
                    .find(|m| m.content == "pong")
                    .map(|_| ())
            },
            WAIT,
        )
        .await;
    assert_eq!(
        h.fake.identify_payloads().len(),
        1,
        "resumed, not re-identified"
    );
    let resume = h.fake.state().resume_payloads[0].clone();
    assert_eq!(resume["session_id"], json!("fake-session-1"));
    h.expect(|s| matches!(s, Seen::Message { content, bot: false, .. } if content == "ping"))
        .await;
    h.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_recorded_as_discord_404s() {
    let mut h = Harness::start().await;
    h.fake
        .user_message(FakeConfig::GENERAL, &alice(), "pins")
        .await;
    let failed = loop {
        match tokio::time::timeout(WAIT, h.seen.recv()).await {
            Ok(Some(Seen::Failed(why))) => break why,
            Ok(Some(_)) => {}
            other => panic!("no failure reported: {other:?}"),
        }
    };
    assert!(
        failed.contains("Not Found") || failed.contains("404"),
        "{failed}"
    );
    let unhandled = h.fake.unhandled_requests();
    let pins = unhandled
        .iter()
        .find(|r| r.path.ends_with("/pins"))
        .expect("pins request recorded");
    assert_eq!((pins.method.as_str(), pins.status), ("GET", 404));
    let body: &Value = pins.response.as_ref().expect("404 body");
    assert_eq!(body["code"], json!(0));
    h.stop().await;
}
