//! `bot console`: the bot's whole pipeline (router, backends, record,
//! feedback) with the terminal instead of Discord. One message per line in,
//! the reply out; `/flag image` or `/flag chat` flags the last reply as a
//! moderator would. Piped input works (one reply per line, then exit).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use router::backends::chat::{ChatMessage, ChatRole};
use router::backends::image::GeneratedImage;
use router::cli::ModelArgs;
use router::config::BotArgs;
use router::feedback::{Origin, RouteKind};
use router::respond::{now_ms, Answer, FlagResult, Incoming, Verdict};
use tokio::io::AsyncBufReadExt;

use crate::app;

/// The console's user id in the record (not a Discord id).
const CONSOLE_USER: u64 = 1;
/// Earlier exchanges kept as chat context.
const CONTEXT: usize = 10;

pub fn run(model: &ModelArgs, args: &BotArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(session(model, args))
}

async fn session(model: &ModelArgs, args: &BotArgs) -> anyhow::Result<()> {
    let app = app::start(model, args).await?;
    let responder = &app.responder;
    let mut ids = Ids::default();
    let mut last_reply: Option<u64> = None;
    let mut history: Vec<ChatMessage> = Vec::new();
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut out = std::io::stdout();
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line.context("reading stdin")?,
            _ = app::shutdown_signal() => None,
        };
        let Some(line) = line else { break };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(arg) = text.strip_prefix("/flag") {
            let target = match arg.trim() {
                "image" => RouteKind::Image,
                "chat" => RouteKind::Chat,
                _ => {
                    writeln!(out, "usage: /flag image | /flag chat")?;
                    continue;
                }
            };
            let Some(reply) = last_reply else {
                writeln!(out, "nothing to flag yet")?;
                continue;
            };
            let context = std::future::ready(history.clone());
            match responder
                .flag(reply, CONSOLE_USER, target, true, context)
                .await
            {
                FlagResult::Recorded { fix, .. } => {
                    writeln!(
                        out,
                        "✅ flag recorded in {}",
                        app.settings.feedback_file.display()
                    )?;
                    show(&mut out, &fix, &app.settings.image_out_dir, reply)?;
                }
                FlagResult::Reported => writeln!(out, "reported")?,
                FlagResult::Ignored(why) => writeln!(out, "nothing recorded: {why}")?,
            }
            continue;
        }
        if responder.admit(CONSOLE_USER) != Verdict::Allowed {
            show(
                &mut out,
                &Answer::RateLimited,
                &app.settings.image_out_dir,
                0,
            )?;
            continue;
        }
        let incoming = Incoming {
            user_message_id: ids.next(),
            guild_id: None,
            channel_id: 0,
            author_id: CONSOLE_USER,
            text: text.to_string(),
            addressed: true,
        };
        let decided = match responder.decide(&incoming, Origin::Console).await {
            Ok(d) => d,
            Err(e) => {
                writeln!(out, "routing failed: {e}")?;
                continue;
            }
        };
        let answer = responder
            .answer(&decided, true, std::future::ready(history.clone()))
            .await;
        let reply = ids.next();
        responder.replied(incoming.user_message_id, reply).await;
        last_reply = Some(reply);
        show(&mut out, &answer, &app.settings.image_out_dir, reply)?;
        history.push(ChatMessage {
            role: ChatRole::User,
            content: text.to_string(),
        });
        if let Answer::Chat { text } = &answer {
            history.push(ChatMessage {
                role: ChatRole::Assistant,
                content: text.clone(),
            });
        }
        let excess = history.len().saturating_sub(CONTEXT);
        history.drain(..excess);
    }
    Ok(())
}

/// Prints an answer; a picture is saved and its path printed.
fn show(out: &mut impl Write, answer: &Answer, dir: &Path, id: u64) -> anyhow::Result<()> {
    match answer {
        Answer::Image { prompt, image } => {
            let path = save(image, dir, id)?;
            writeln!(out, "🎨 image  prompt: {prompt}\n   saved: {}", path.display())?;
        }
        Answer::ImageUnconfigured { prompt } => writeln!(
            out,
            "🎨 image  prompt: {prompt}\n   (no image backend: set IMAGE_BACKEND=openai|a1111 and IMAGE_API_BASE in .env to draw it)"
        )?,
        Answer::ImageFailed { prompt, reason } => {
            writeln!(out, "🎨 image  prompt: {prompt}\n   {reason}")?
        }
        Answer::Chat { text } => writeln!(out, "💬 {text}")?,
        Answer::ChatFailed { reason } => writeln!(out, "💬 {reason}")?,
        Answer::ChatUnconfigured => writeln!(
            out,
            "💬 chat (no chat backend: set CHAT_API_BASE and CHAT_MODEL in .env for answers)"
        )?,
        Answer::RateLimited => writeln!(out, "slow down: rate limit reached")?,
        Answer::Silent => {}
    }
    out.flush()?;
    Ok(())
}

fn save(image: &GeneratedImage, dir: &Path, id: u64) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{id}.{}", image.format.extension()));
    std::fs::write(&path, &image.bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Message ids for console turns: increasing, and distinct across runs
/// (they key the record, which survives restarts), like Discord snowflakes.
#[derive(Default)]
struct Ids {
    last: u64,
}

impl Ids {
    fn next(&mut self) -> u64 {
        let now = (now_ms().max(0) as u64) << 22;
        self.last = now.max(self.last + 1);
        self.last
    }
}
