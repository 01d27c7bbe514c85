//! The bot end to end: the REAL `bot` binary (serenity client, engine,
//! backends, record, feedback) against a fake Discord on 127.0.0.1 (REST +
//! WebSocket gateway with Discord's payload shapes) and local image and chat
//! servers speaking the real protocols.
#![cfg(feature = "bot")]

#[path = "support/backends.rs"]
mod backends;
#[path = "support/bot.rs"]
mod bot;
#[path = "support/discord.rs"]
mod discord;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use backends::{tiny_png, FakeBackend, Fault};
use bot::{jsonl, BotProcess};
use discord::{FakeConfig, FakeDiscord, FakeUser, SentMessage};
use router::prompt::{parse_reply, Reply};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const GENERAL: u64 = FakeConfig::GENERAL;

fn alice() -> FakeUser {
    FakeUser::new(200_000_000_000_000_001, "alice")
}
fn bob() -> FakeUser {
    FakeUser::new(200_000_000_000_000_002, "bob")
}
/// Holds the guild's Moderator role (Manage Messages).
fn mod_mia() -> FakeUser {
    FakeUser::new(200_000_000_000_000_003, "mia").with_roles(&[FakeConfig::MODERATOR])
}
fn mod_max() -> FakeUser {
    FakeUser::new(200_000_000_000_000_004, "max").with_roles(&[FakeConfig::MODERATOR])
}

/// The environment of a bot talking to these fakes, writing under `dir`.
fn env(
    fake: &FakeDiscord,
    image: Option<&FakeBackend>,
    chat: Option<&FakeBackend>,
    model: Vec<(&'static str, String)>,
    dir: &Path,
) -> BTreeMap<String, String> {
    let mut e: BTreeMap<String, String> = BTreeMap::new();
    e.insert("DISCORD_TOKEN".into(), fake.config().token.clone());
    e.insert("DISCORD_API_BASE".into(), fake.base_url());
    e.insert(
        "ROUTER_DB".into(),
        dir.join("router.sqlite3").display().to_string(),
    );
    e.insert(
        "FEEDBACK_FILE".into(),
        dir.join("feedback.jsonl").display().to_string(),
    );
    e.insert(
        "REPORTS_FILE".into(),
        dir.join("reports.jsonl").display().to_string(),
    );
    e.insert("ROUTER_DEVICE".into(), "cpu".into());
    e.insert("RATE_LIMIT_PER_MINUTE".into(), "0".into());
    if let Some(b) = image {
        e.insert("IMAGE_BACKEND".into(), "openai".into());
        e.insert("IMAGE_API_BASE".into(), b.base_url());
        e.insert("IMAGE_API_KEY".into(), "sk-image-secret-42".into());
    }
    if let Some(b) = chat {
        e.insert("CHAT_API_BASE".into(), b.base_url());
        e.insert("CHAT_MODEL".into(), "fake-chat".into());
        e.insert("CHAT_API_KEY".into(), "sk-chat-secret-42".into());
    }
    for (k, v) in model {
        e.insert(k.into(), v);
    }
    e
}

/// The bot's first message replying to `user_message`.
async fn reply_to(fake: &FakeDiscord, user_message: u64, bot: &BotProcess) -> SentMessage {
    let found = tokio::time::timeout(
        WAIT,
        fake.wait_for(
            |s| {
                s.bot_messages
                    .iter()
                    .find(|m| m.reference_message_id == Some(user_message))
                    .cloned()
            },
            WAIT,
        ),
    )
    .await;
    found.unwrap_or_else(|_| panic!("no reply to {user_message}; bot stderr:\n{}", bot.stderr()))
}

async fn wait_rows(path: &Path, n: usize, bot: &BotProcess) -> Vec<Value> {
    for _ in 0..600 {
        let rows = jsonl(path);
        if rows.len() >= n {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{} never reached {n} rows; bot stderr:\n{}",
        path.display(),
        bot.stderr()
    );
}

fn no_pings(m: &SentMessage) {
    let am = m
        .allowed_mentions
        .clone()
        .expect("allowed_mentions set on every message");
    assert_eq!(am["parse"], json!([]), "{am}");
    assert!(am.get("roles").is_none_or(|r| r == &json!([])), "{am}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_draws_chats_takes_flags_and_survives_a_failing_backend() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let images = backends::start().await;
    let chat = backends::start().await;
    chat.set_reply("Ghibli: soft watercolour skies, @everyone look! <@&100000000000000201>");
    let e = env(
        &fake,
        Some(&images),
        Some(&chat),
        bot::default_model_env(),
        dir.path(),
    );
    let bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_ready(WAIT).await;

    // An image request gets a picture, as a reply, with the prompt in the text.
    let ask = fake
        .user_message(GENERAL, &alice(), "幫我畫一隻在月光下彈吉他的狐狸")
        .await;
    let pic = reply_to(&fake, ask, &bot).await;
    assert_eq!(pic.files.len(), 1, "{pic:?}");
    assert_eq!(pic.files[0].1, tiny_png());
    assert!(pic.content.contains("狐狸"), "{}", pic.content);
    no_pings(&pic);
    let sent = images.requests();
    assert!(sent[0].json["prompt"].as_str().unwrap().contains("狐狸"));

    // A question gets the chat backend's text; @everyone in it pings nobody.
    let q = fake
        .user_message(GENERAL, &alice(), "吉卜力風格的主要元素有哪些？")
        .await;
    let text = reply_to(&fake, q, &bot).await;
    assert!(
        text.content.starts_with("Ghibli: soft watercolour"),
        "{}",
        text.content
    );
    assert!(text.files.is_empty());
    no_pings(&text);

    // A moderator says the chat reply should have been a picture: exactly one
    // training row, an acknowledgement, and the answer fixed in place.
    let feedback = dir.path().join("feedback.jsonl");
    fake.reaction_add(GENERAL, text.id, &mod_mia(), "🖼").await;
    let rows = wait_rows(&feedback, 1, &bot).await;
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        row["messages"][0]["content"],
        "吉卜力風格的主要元素有哪些？"
    );
    let corrected = row["messages"][1]["content"].as_str().unwrap();
    assert!(
        matches!(parse_reply(corrected), Reply::Call { .. }),
        "{corrected}"
    );
    assert_eq!(row["meta"]["original_route"], "chat");
    assert_eq!(row["meta"]["flagger_id"], mod_mia().id.to_string());
    assert_eq!(row["meta"]["retracted"], false);
    fake.wait_for(
        |s| {
            let acked = s
                .reactions_by_bot
                .iter()
                .any(|r| r.message_id == text.id && r.emoji == "✅");
            let fixed = s
                .bot_messages
                .iter()
                .any(|m| m.id == text.id && m.edited && m.files.len() == 1);
            (acked && fixed).then_some(())
        },
        WAIT,
    )
    .await;

    // A second flag, a non-moderator's flag and a flag agreeing with the
    // route add no row; the non-moderator's is counted in the reports.
    fake.reaction_add(GENERAL, text.id, &mod_max(), "🖼️").await;
    fake.reaction_add(GENERAL, pic.id, &bob(), "💬").await;
    fake.reaction_add(GENERAL, pic.id, &mod_max(), "🖼️").await;
    let reports = dir.path().join("reports.jsonl");
    wait_rows(&reports, 1, &bot).await;
    // A later event that does write proves the three above were handled.
    fake.reaction_remove(GENERAL, text.id, &mod_mia(), "🖼")
        .await;
    let rows = wait_rows(&feedback, 2, &bot).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["meta"]["retracted"], true);
    assert_eq!(rows[1]["messages"], rows[0]["messages"]);
    assert_eq!(jsonl(&reports).len(), 1);

    // A failing image backend: a friendly reply, and the next message is served.
    images.set_fault(Some(Fault::Status {
        status: 500,
        body: "{\"error\":\"CUDA out of memory\"}".into(),
    }));
    let fail = fake
        .user_message(GENERAL, &bob(), "請幫我畫一張夕陽下的富士山，水彩風格")
        .await;
    let sorry = reply_to(&fake, fail, &bot).await;
    assert!(sorry.files.is_empty());
    assert!(
        !sorry.content.contains("CUDA out of memory"),
        "{}",
        sorry.content
    );
    images.set_fault(None);
    let again = fake
        .user_message(GENERAL, &bob(), "幫我畫一隻戴墨鏡的橘貓")
        .await;
    assert_eq!(reply_to(&fake, again, &bot).await.files.len(), 1);

    // /draw: a picture of exactly the prompt, through a deferred interaction.
    fake.interaction_command(
        GENERAL,
        &bob(),
        "draw",
        vec![discord::option("prompt", 3, json!("a red bicycle"))],
    )
    .await;
    let drawn = fake
        .wait_for(
            |s| {
                s.interaction_responses
                    .iter()
                    .find(|r| !r.files.is_empty())
                    .cloned()
            },
            WAIT,
        )
        .await;
    assert!(drawn.json["content"]
        .as_str()
        .unwrap()
        .contains("a red bicycle"));
    assert_eq!(
        images.requests().last().unwrap().json["prompt"],
        "a red bicycle"
    );

    // The message command "Route: chat" on the picture reply, by a
    // moderator: one more row, the answer replaced by chat text in place.
    fake.interaction_message_command(GENERAL, &mod_max(), "Route: chat", pic.id)
        .await;
    let rows = wait_rows(&feedback, 3, &bot).await;
    assert_eq!(
        rows[2]["messages"][0]["content"],
        "幫我畫一隻在月光下彈吉他的狐狸"
    );
    assert_eq!(rows[2]["meta"]["corrected_route"], "chat");
    assert!(matches!(
        parse_reply(rows[2]["messages"][1]["content"].as_str().unwrap()),
        Reply::Chat(_)
    ));
    fake.wait_for(
        |s| {
            s.bot_messages
                .iter()
                .any(|m| m.id == pic.id && m.edited && m.files.is_empty())
                .then_some(())
        },
        WAIT,
    )
    .await;
    // The same command from a non-moderator is refused.
    fake.interaction_message_command(GENERAL, &bob(), "Route: image", text.id)
        .await;
    // /router-stats for a moderator.
    let before = fake.interaction_responses().len();
    fake.interaction_command(GENERAL, &mod_mia(), "router-stats", vec![])
        .await;
    let stats = fake
        .wait_for(
            |s| {
                s.interaction_responses[before..]
                    .iter()
                    .find(|r| r.json.to_string().contains("Messages routed"))
                    .cloned()
            },
            WAIT,
        )
        .await;
    let stats = stats.json.to_string();
    assert!(stats.contains("gemma3-270m"), "{stats}");
    assert!(
        fake.interaction_responses()
            .iter()
            .any(|r| r.json.to_string().contains("for moderators")),
        "the non-moderator's command was not refused"
    );
    assert_eq!(jsonl(&feedback).len(), 3);

    // Commands were registered; secrets never reached the logs.
    assert!(fake.state().commands.contains_key(&None));
    let log = bot.stderr();
    for secret in [
        &fake.config().token,
        "sk-image-secret-42",
        "sk-chat-secret-42",
    ] {
        assert!(!log.contains(secret), "a secret reached the log");
    }
    assert!(
        fake.unhandled_requests().is_empty(),
        "{:?}",
        fake.unhandled_requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_messages_from_twenty_users_each_answered_once_or_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let chat = backends::start().await;
    let mut e = env(&fake, None, Some(&chat), bot::tiny_model_env(), dir.path());
    e.insert("RATE_LIMIT_PER_MINUTE".into(), "5".into());
    // The tiny model routes at random: image routes answer with the prompt.
    let bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_ready(WAIT).await;

    let users: Vec<FakeUser> = (0..20)
        .map(|i| FakeUser::new(300_000_000_000_000_000 + i, &format!("user{i}")))
        .collect();
    let mut sent: HashMap<u64, u64> = HashMap::new(); // message -> author
    for round in 0..10 {
        for u in &users {
            let id = fake
                .user_message(GENERAL, u, &format!("message {round} from {}", u.name))
                .await;
            sent.insert(id, u.id);
        }
    }
    // 5 answers and one polite refusal per user.
    let replies = tokio::time::timeout(
        WAIT * 2,
        fake.wait_for(
            |s| {
                let r: Vec<SentMessage> = s
                    .bot_messages
                    .iter()
                    .filter(|m| m.reference_message_id.is_some())
                    .cloned()
                    .collect();
                (r.len() >= 120).then_some(r)
            },
            WAIT * 2,
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("not all answered; stderr:\n{}", bot.stderr()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replies_now = fake.bot_messages();
    assert_eq!(
        replies_now
            .iter()
            .filter(|m| m.reference_message_id.is_some())
            .count(),
        120,
        "more replies than expected"
    );
    let mut answered = HashSet::new();
    let mut per_user: HashMap<u64, (usize, usize)> = HashMap::new();
    for r in &replies {
        let to = r.reference_message_id.unwrap();
        assert!(answered.insert(to), "message {to} answered twice");
        let author = sent[&to];
        let e = per_user.entry(author).or_default();
        if r.content.contains("faster than I can keep up") {
            e.1 += 1;
        } else {
            e.0 += 1;
        }
        no_pings(r);
    }
    for u in &users {
        assert_eq!(per_user[&u.id], (5, 1), "user {}", u.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_while_flags_are_written_then_restart_and_flags_still_resolve() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let chat = backends::start().await;
    let e = env(&fake, None, Some(&chat), bot::tiny_model_env(), dir.path());
    let mut bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_ready(WAIT).await;

    // Thirty replies, each from its own user.
    let mut replies = Vec::new();
    for i in 0..30u64 {
        let u = FakeUser::new(400_000_000_000_000_000 + i, &format!("u{i}"));
        let id = fake
            .user_message(GENERAL, &u, &format!("tell me something {i}"))
            .await;
        replies.push(id);
    }
    let mut bot_replies = Vec::new();
    for id in &replies {
        bot_replies.push(reply_to(&fake, *id, &bot).await);
    }
    // Flags pour in; the bot is killed while it writes them.
    let feedback = dir.path().join("feedback.jsonl");
    for r in &bot_replies {
        let emoji = if r.files.is_empty() && !r.content.starts_with("🎨") {
            "🖼️"
        } else {
            "💬"
        };
        fake.reaction_add(GENERAL, r.id, &mod_mia(), emoji).await;
    }
    wait_rows(&feedback, 3, &bot).await;
    bot.kill9();
    let before = jsonl(&feedback); // panics on a torn line
    assert!(!before.is_empty());

    // Restarted on the same record and file: flags on old replies resolve,
    // and every reply ends up with exactly one live row.
    let bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_for(|s| (s.identify_payloads.len() >= 2).then_some(()), WAIT)
        .await;
    fake.wait_ready(WAIT).await;
    for r in &bot_replies {
        let emoji = if r.files.is_empty() && !r.content.starts_with("🎨") {
            "🖼️"
        } else {
            "💬"
        };
        fake.reaction_add(GENERAL, r.id, &mod_max(), emoji).await;
    }
    let rows = wait_rows(&feedback, 30, &bot).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows_now = jsonl(&feedback);
    assert_eq!(rows_now.len(), rows.len());
    let texts: HashSet<String> = rows_now
        .iter()
        .map(|r| r["messages"][0]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts.len(), 30, "every flagged reply has a row");
    assert_eq!(rows_now.len(), 30, "no reply has two rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promoted_adapter_goes_live_while_messages_flow_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = bot::repo().join("tests/fixtures/tiny_gemma3/adapter");
    let adapters = dir.path().join("adapters");
    for name in ["a", "b"] {
        let d = adapters.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&fixture).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
    }
    std::fs::create_dir_all(adapters.join("broken")).unwrap();
    std::fs::write(adapters.join("broken/adapter_config.json"), "{not json").unwrap();
    let link = dir.path().join("current");
    std::os::unix::fs::symlink("adapters/a", &link).unwrap();

    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let chat = backends::start().await;
    let mut e = env(&fake, None, Some(&chat), bot::tiny_model_env(), dir.path());
    e.insert("ROUTER_ADAPTER".into(), link.display().to_string());
    e.insert("ADAPTER_WATCH_SECS".into(), "1".into());
    let bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_ready(WAIT).await;

    let promote = |target: &str| {
        let tmp = dir.path().join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp).unwrap();
        std::fs::rename(&tmp, &link).unwrap();
    };
    let record = router::feedback::Record::open(&dir.path().join("router.sqlite3")).unwrap();
    let adapter_of = |id: u64| {
        record
            .by_user_message(id)
            .unwrap()
            .and_then(|d| d.adapter)
            .unwrap_or_default()
    };
    let mut ids = Vec::new();
    for i in 0..30u64 {
        let u = FakeUser::new(500_000_000_000_000_000 + i, &format!("u{i}"));
        ids.push(fake.user_message(GENERAL, &u, &format!("hello {i}")).await);
        if i == 10 {
            promote("adapters/b");
        }
        if i == 20 {
            promote("adapters/broken");
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for id in &ids {
        reply_to(&fake, *id, &bot).await; // none failed
    }
    let first = adapter_of(ids[0]);
    let last = adapter_of(ids[29]);
    assert!(first.ends_with("adapters/a"), "{first}");
    assert!(
        last.ends_with("adapters/b"),
        "the broken adapter must not replace b: {last}"
    );
    assert!(bot.stderr().contains("refused"), "{}", bot.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_the_message_in_flight_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let chat = backends::start().await;
    chat.set_delay(Duration::from_secs(2));
    let e = env(&fake, None, Some(&chat), bot::tiny_model_env(), dir.path());
    let mut e2 = e.clone();
    // Every message is chat for this test: nothing reaches the image side.
    e2.insert("ROUTER_CALL_THRESHOLD".into(), "2".into());
    let mut bot = BotProcess::start(dir.path(), &["serve"], &e2);
    fake.wait_ready(WAIT).await;
    let id = fake.user_message(GENERAL, &alice(), "how are you?").await;
    // Wait until the chat backend has the request, then ask the bot to stop.
    for _ in 0..600 {
        if !chat.requests().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!chat.requests().is_empty(), "{}", bot.stderr());
    bot.terminate();
    let status = bot.wait_exit(WAIT).await;
    assert!(status.success(), "{status:?}\n{}", bot.stderr());
    assert!(fake
        .bot_messages()
        .iter()
        .any(|m| m.reference_message_id == Some(id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_rejected_tokens_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let mut e = env(&fake, None, None, bot::tiny_model_env(), dir.path());
    let cases = [
        (None, "DISCORD_TOKEN is not set"),
        (Some("not-a-token"), "DISCORD_TOKEN is malformed"),
        (Some("wrong.bot.token"), "Discord rejected DISCORD_TOKEN"),
    ];
    for (token, want) in cases {
        match token {
            Some(t) => e.insert("DISCORD_TOKEN".into(), t.into()),
            None => e.remove("DISCORD_TOKEN"),
        };
        let mut bot = BotProcess::start(dir.path(), &["serve"], &e);
        let status = bot.wait_exit(WAIT).await;
        assert!(!status.success());
        let err = bot.stderr();
        let last = err.lines().last().unwrap_or_default();
        assert!(last.starts_with("error: ") && last.contains(want), "{err}");
        assert!(
            !err.contains("panicked") && !err.contains("wrong.bot.token"),
            "{err}"
        );
    }
}

#[test]
fn console_routes_flags_and_works_without_configuration() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut e = BTreeMap::new();
    for (k, v) in bot::default_model_env() {
        e.insert(k.to_string(), v);
    }
    e.insert("ROUTER_DEVICE".into(), "cpu".into());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_bot"));
    cmd.arg("console")
        .current_dir(dir.path())
        .env("ROUTER_HOME", dir.path())
        .envs(&e)
        .env_remove("IMAGE_BACKEND")
        .env_remove("CHAT_API_BASE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            "幫我畫一隻在月光下彈吉他的狐狸\n吉卜力風格的主要元素有哪些？\n/flag image\n"
                .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("🎨 image  prompt: ") && lines[0].contains("狐狸"),
        "{stdout}"
    );
    assert!(stdout.contains("no image backend"), "{stdout}");
    assert!(stdout.contains("no chat backend"), "{stdout}");
    assert!(stdout.contains("flag recorded"), "{stdout}");
    // Defaults resolve against the home: the record and the feedback row.
    let rows = jsonl(&dir.path().join("datas/feedback/discord.jsonl"));
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0]["messages"][0]["content"],
        "吉卜力風格的主要元素有哪些？"
    );
    assert!(dir.path().join("var/router.sqlite3").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowed_channels_mentions_dms_bots_and_a_shard_range() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeDiscord::start(FakeConfig::default()).await;
    let chat = backends::start().await;
    let mut e = env(&fake, None, Some(&chat), bot::tiny_model_env(), dir.path());
    // Every message is chat: the replies are the chat backend's.
    e.insert("ROUTER_CALL_THRESHOLD".into(), "2".into());
    e.insert("ALLOWED_CHANNEL_IDS".into(), FakeConfig::IMAGES.to_string());
    e.insert("SHARD_RANGE".into(), "0..1/1".into());
    let bot = BotProcess::start(dir.path(), &["serve"], &e);
    fake.wait_ready(WAIT).await;
    let shard = &fake.identify_payloads()[0]["shard"];
    assert_eq!(shard, &json!([0, 1]), "{shard}");

    let me = format!("<@{}>", FakeConfig::BOT_ID);
    let outside = fake.user_message(GENERAL, &alice(), "hello everyone").await;
    let mentioned = fake
        .user_message(GENERAL, &alice(), &format!("{me} hello bot"))
        .await;
    let inside = fake
        .user_message(FakeConfig::IMAGES, &alice(), "hi there")
        .await;
    let dm = fake.dm_message(&bob(), "hi in private").await;
    let mut robot = FakeUser::new(600_000_000_000_000_001, "otherbot");
    robot.bot = true;
    let from_bot = fake.user_message(FakeConfig::IMAGES, &robot, "beep").await;
    for id in [mentioned, inside, dm] {
        reply_to(&fake, id, &bot).await;
    }
    // A message answered after the ignored ones proves they were handled.
    let last = fake
        .user_message(FakeConfig::IMAGES, &alice(), "last one")
        .await;
    reply_to(&fake, last, &bot).await;
    let answered: HashSet<u64> = fake
        .bot_messages()
        .iter()
        .filter_map(|m| m.reference_message_id)
        .collect();
    assert!(
        !answered.contains(&outside),
        "a message outside ALLOWED_CHANNEL_IDS was answered"
    );
    assert!(
        !answered.contains(&from_bot),
        "another bot's message was answered"
    );
}
