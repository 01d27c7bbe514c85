//! The transport-neutral pipeline: a message goes through the router, then
//! to the image or the chat backend; a moderator's flag becomes a training
//! row and a corrected answer. Discord and the console both drive it; neither
//! knows how a decision is made, and this module knows nothing of Discord.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::backends::chat::{ChatBackend, ChatMessage};
use crate::backends::image::{GeneratedImage, ImageBackend};
use crate::engine::Engine;
use crate::feedback::{
    DecisionRow, FeedbackError, FeedbackLog, FeedbackRow, FlagOutcome, Origin, Record, ReportLog,
    ReportRow, RouteKind, Stats,
};
use crate::prompt::render_call;
use crate::router::Route;

/// Longest message text handed to the router, in characters; the engine
/// bounds tokens too, this only keeps tokenization cheap on huge pastes.
const MAX_ROUTED_CHARS: usize = 4000;

/// A message to answer, wherever it came from.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub user_message_id: u64,
    pub guild_id: Option<u64>,
    pub channel_id: u64,
    pub author_id: u64,
    pub text: String,
    /// A direct message or a mention of the bot: the user is talking to it,
    /// so it answers even when it has nothing else to say.
    pub addressed: bool,
}

impl Incoming {
    /// The record row for this message (adapter and latency left empty).
    fn decision(&self, route: RouteKind, prompt: Option<String>, origin: Origin) -> DecisionRow {
        DecisionRow {
            user_message_id: self.user_message_id,
            reply_message_id: None,
            guild_id: self.guild_id,
            channel_id: self.channel_id,
            author_id: self.author_id,
            text: self.text.clone(),
            route,
            prompt,
            adapter: None,
            latency_ms: 0.0,
            created_at_ms: now_ms(),
            origin,
        }
    }
}

/// What the router decided for a message, with its record row.
#[derive(Debug, Clone)]
pub struct Decided {
    pub row: DecisionRow,
}

impl Decided {
    pub fn is_image(&self) -> bool {
        self.row.route == RouteKind::Image
    }
}

/// The answer to show the user.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A picture for this prompt.
    Image {
        prompt: String,
        image: GeneratedImage,
    },
    /// The route was image but the picture could not be made; `reason` is
    /// a friendly sentence.
    ImageFailed { prompt: String, reason: String },
    /// The route was image and no image backend is configured.
    ImageUnconfigured { prompt: String },
    /// A chat answer.
    Chat { text: String },
    /// The chat backend failed; `reason` is a friendly sentence.
    ChatFailed { reason: String },
    /// Chat route, no chat backend, and the user addressed the bot.
    ChatUnconfigured,
    /// Over the rate limit (said once per window).
    RateLimited,
    /// Nothing to send.
    Silent,
}

/// What a flag did.
#[derive(Debug, Clone)]
pub enum FlagResult {
    /// A moderator's flag: one training row written; `fix` replaces the answer.
    Recorded { decision: DecisionRow, fix: Answer },
    /// Anyone else's flag: counted for moderators to review.
    Reported,
    /// Nothing to do (agrees with the route, duplicate, not the bot's reply,
    /// an explicit `/draw`).
    Ignored(&'static str),
}

/// Per-user rate limit over a sliding minute. Time is a parameter, so the
/// logic is tested without waiting.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    users: HashMap<u64, UserWindow>,
}

#[derive(Debug, Default)]
struct UserWindow {
    recent: VecDeque<Instant>,
    /// The user has been told once in this window; stay quiet until it clears.
    told: bool,
}

/// A rate-limit verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the limit, first time in this window: say so politely.
    LimitedTell,
    /// Over the limit again: say nothing.
    LimitedQuiet,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            users: HashMap::new(),
        }
    }

    pub fn check(&mut self, user: u64, now: Instant) -> Verdict {
        if self.per_minute == 0 {
            return Verdict::Allowed;
        }
        let window = Duration::from_secs(60);
        // Forget users idle for a whole window, so the map stays small.
        self.users.retain(|_, w| {
            w.recent
                .back()
                .is_some_and(|&t| now.saturating_duration_since(t) < window)
        });
        let w = self.users.entry(user).or_default();
        while w
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= window)
        {
            w.recent.pop_front();
        }
        if (w.recent.len() as u32) < self.per_minute {
            w.recent.push_back(now);
            w.told = false;
            Verdict::Allowed
        } else if w.told {
            Verdict::LimitedQuiet
        } else {
            w.told = true;
            Verdict::LimitedTell
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Cuts `text` to at most `max` characters (never inside a character).
pub fn cut_chars(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Everything a message needs: router, backends, record and logs.
pub struct Responder {
    pub engine: Engine,
    pub image: Option<ImageBackend>,
    pub chat: Option<ChatBackend>,
    pub record: Record,
    pub feedback: FeedbackLog,
    pub reports: ReportLog,
    limiter: Mutex<RateLimiter>,
}

impl Responder {
    pub fn new(
        engine: Engine,
        image: Option<ImageBackend>,
        chat: Option<ChatBackend>,
        record: Record,
        feedback: FeedbackLog,
        reports: ReportLog,
        rate_limit_per_minute: u32,
    ) -> Self {
        Self {
            engine,
            image,
            chat,
            record,
            feedback,
            reports,
            limiter: Mutex::new(RateLimiter::new(rate_limit_per_minute)),
        }
    }

    /// The rate-limit verdict for `user` now.
    pub fn admit(&self, user: u64) -> Verdict {
        match self.limiter.lock() {
            Ok(mut l) => l.check(user, Instant::now()),
            Err(_) => Verdict::Allowed,
        }
    }

    /// Routes a message and records the decision.
    pub async fn decide(&self, msg: &Incoming, origin: Origin) -> Result<Decided, String> {
        let text = cut_chars(&msg.text, MAX_ROUTED_CHARS).to_string();
        let routed = self.engine.route(text).await.map_err(|e| e.to_string())?;
        let d = &routed.decision;
        let (route, prompt) = match (d.route, &d.prompt) {
            (Route::Image, Some(p)) => (RouteKind::Image, Some(p.clone())),
            _ => (RouteKind::Chat, None),
        };
        let mut row = msg.decision(route, prompt, origin);
        row.adapter = routed.adapter.as_ref().map(|p| p.display().to_string());
        row.latency_ms = routed.batch_ms;
        tracing::info!(
            message = msg.user_message_id,
            channel = msg.channel_id,
            route = ?row.route,
            ms = format!("{:.1}", routed.batch_ms),
            "routed"
        );
        let stored = row.clone();
        self.store(move |r| r.insert_decision(&stored)).await;
        Ok(Decided { row })
    }

    /// Records an explicit `/draw` request (never routing feedback).
    pub async fn record_draw(&self, msg: &Incoming, prompt: &str) -> DecisionRow {
        let row = msg.decision(RouteKind::Image, Some(prompt.to_string()), Origin::Draw);
        let stored = row.clone();
        self.store(move |r| r.insert_decision(&stored)).await;
        row
    }

    /// The answer for a decided message. `context` fetches earlier messages
    /// for the chat backend; it runs only when they are needed.
    pub async fn answer<F>(&self, decided: &Decided, addressed: bool, context: F) -> Answer
    where
        F: Future<Output = Vec<ChatMessage>>,
    {
        match (&decided.row.route, &decided.row.prompt) {
            (RouteKind::Image, Some(prompt)) => self.draw(prompt).await,
            // Not addressed and nothing to say: stay silent.
            _ if self.chat.is_none() && !addressed => Answer::Silent,
            _ => self.chat_answer(&decided.row.text, context).await,
        }
    }

    /// A picture for `prompt`, or why there is none.
    pub async fn draw(&self, prompt: &str) -> Answer {
        let prompt = prompt.to_string();
        match &self.image {
            None => Answer::ImageUnconfigured { prompt },
            Some(backend) => match backend.generate(&prompt).await {
                Ok(image) => Answer::Image { prompt, image },
                Err(e) => {
                    tracing::warn!(error = %e, "image backend failed");
                    Answer::ImageFailed {
                        prompt,
                        reason: e.user_message(),
                    }
                }
            },
        }
    }

    /// The chat backend's answer; `context` is awaited only when there is
    /// a backend to send it to.
    async fn chat_answer<F>(&self, text: &str, context: F) -> Answer
    where
        F: Future<Output = Vec<ChatMessage>>,
    {
        let Some(chat) = &self.chat else {
            return Answer::ChatUnconfigured;
        };
        match chat.reply(&context.await, text).await {
            Ok(text) => Answer::Chat { text },
            Err(e) => {
                tracing::warn!(error = %e, "chat backend failed");
                Answer::ChatFailed {
                    reason: e.user_message(),
                }
            }
        }
    }

    /// Notes which bot message answered a user message (flags arrive on it).
    pub async fn replied(&self, user_message_id: u64, reply_message_id: u64) {
        self.store(move |r| r.set_reply(user_message_id, reply_message_id))
            .await;
    }

    /// A flag on the bot's reply `reply_message_id`: "this should have been
    /// `target`". A moderator's flag writes one training row and returns the
    /// corrected answer; anyone else's is counted in the reports file.
    pub async fn flag<F>(
        &self,
        reply_message_id: u64,
        flagger_id: u64,
        target: RouteKind,
        moderator: bool,
        context: F,
    ) -> FlagResult
    where
        F: Future<Output = Vec<ChatMessage>>,
    {
        let now = now_ms();
        if !moderator {
            let Ok(Some(decision)) = self.lookup(reply_message_id).await else {
                return FlagResult::Ignored("not a routed reply");
            };
            let report = ReportRow::new(&decision, reply_message_id, flagger_id, target, now);
            if let Err(e) = self.reports.append(&report) {
                tracing::error!(error = %e, "cannot count a report");
            }
            return FlagResult::Reported;
        }
        // Checked first, so the corrected answer (which may run the model or
        // a backend) is made only for a flag that will count.
        let preview = self
            .blocking(move |r| r.preview_flag(reply_message_id, target))
            .await;
        let decision = match preview {
            Ok(FlagOutcome::Recorded(d)) => d,
            Ok(other) => return FlagResult::Ignored(ignored(&other)),
            Err(e) => {
                tracing::error!(error = %e, "cannot check a flag");
                return FlagResult::Ignored("record unavailable");
            }
        };
        let (corrected, fix) = match target {
            RouteKind::Image => {
                let prompt = self.prompt_for(&decision.text).await;
                // Drawn below, once the row is safely written.
                (render_call(&prompt), Answer::ImageUnconfigured { prompt })
            }
            RouteKind::Chat => {
                let answer = self.chat_answer(&decision.text, context).await;
                let text = match &answer {
                    Answer::Chat { text } => text.clone(),
                    _ => plain_fallback(&decision.text).to_string(),
                };
                (text, answer)
            }
        };
        // The claim stores the corrected answer: if the process dies before
        // the row is appended, start-up writes it (see `reconcile`).
        let claim = corrected.clone();
        let outcome = self
            .blocking(move |r| r.flag(reply_message_id, flagger_id, target, now, &claim))
            .await;
        match outcome {
            Ok(FlagOutcome::Recorded(_)) => {}
            Ok(other) => return FlagResult::Ignored(ignored(&other)),
            Err(e) => {
                tracing::error!(error = %e, "cannot record a flag");
                return FlagResult::Ignored("record unavailable");
            }
        }
        let row = FeedbackRow::new(&decision, corrected, target, flagger_id, now, false);
        self.write_row(&row, decision.user_message_id, now, false)
            .await;
        tracing::info!(
            reply = reply_message_id,
            flagger = flagger_id,
            target = ?target,
            "flag recorded"
        );
        let fix = match fix {
            Answer::ImageUnconfigured { prompt } => self.draw(&prompt).await,
            other => other,
        };
        FlagResult::Recorded { decision, fix }
    }

    /// The flag was taken back: append the same row, marked retracted, so
    /// that `train` drops the text again.
    pub async fn unflag(&self, reply_message_id: u64, flagger_id: u64, target: RouteKind) -> bool {
        let now = now_ms();
        let retracted = self
            .blocking(move |r| r.unflag(reply_message_id, flagger_id, target, now))
            .await;
        let Ok(Some((decision, corrected))) = retracted else {
            return false;
        };
        let row = FeedbackRow::new(&decision, corrected, target, flagger_id, now, true);
        self.write_row(&row, decision.user_message_id, now, true)
            .await;
        tracing::info!(
            reply = reply_message_id,
            flagger = flagger_id,
            "flag retracted"
        );
        true
    }

    /// Appends a training row, then marks it written in the record.
    async fn write_row(
        &self,
        row: &FeedbackRow,
        user_message_id: u64,
        at_ms: i64,
        retraction: bool,
    ) {
        if let Err(e) = self.feedback.append(row) {
            // The claim stays unwritten in the record; the next start writes it.
            tracing::error!(error = %e, "cannot append a feedback row");
            return;
        }
        let marked = self
            .blocking(move |r| r.row_written(user_message_id, at_ms, retraction))
            .await;
        if let Err(e) = marked {
            tracing::error!(error = %e, "cannot mark a feedback row written");
        }
    }

    /// Writes the training rows a crash left claimed but unwritten; a row
    /// that did reach the file before the crash is not written twice.
    /// Returns how many rows were appended.
    pub async fn reconcile(&self) -> Result<usize, FeedbackError> {
        let pending = self.blocking(|r| r.unwritten_rows()).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let present: Vec<FeedbackRow> = self.feedback.log().read()?;
        let mut appended = 0;
        for p in pending {
            let row = p.row();
            if !present.contains(&row) {
                self.feedback.append(&row)?;
                appended += 1;
            }
            let (user, at, retraction) = (p.decision.user_message_id, p.time_ms, p.retraction);
            self.blocking(move |r| r.row_written(user, at, retraction))
                .await?;
        }
        if appended > 0 {
            tracing::warn!(
                appended,
                "feedback rows left unwritten by a crash were written"
            );
        }
        Ok(appended)
    }

    /// What the record says, for `/router-stats`.
    pub async fn stats(&self) -> Result<Stats, FeedbackError> {
        self.blocking(|r| r.stats()).await
    }

    /// The prompt for a message that should have been a picture: what the
    /// model writes once the call is forced, else the message itself.
    async fn prompt_for(&self, text: &str) -> String {
        let cut = cut_chars(text, MAX_ROUTED_CHARS).to_string();
        match self.engine.extract_prompt(cut).await {
            Ok(Some(p)) => p,
            Ok(None) => text.trim().to_string(),
            Err(e) => {
                tracing::warn!(error = %e, "prompt extraction failed; using the message");
                text.trim().to_string()
            }
        }
    }

    async fn lookup(&self, reply_message_id: u64) -> Result<Option<DecisionRow>, FeedbackError> {
        self.blocking(move |r| r.by_reply(reply_message_id)).await
    }

    /// Runs a record call off the async workers (SQLite may wait on a lock).
    async fn blocking<T, F>(&self, f: F) -> Result<T, FeedbackError>
    where
        F: FnOnce(&Record) -> Result<T, FeedbackError> + Send + 'static,
        T: Send + 'static,
    {
        let record = self.record.clone();
        match tokio::task::spawn_blocking(move || f(&record)).await {
            Ok(r) => r,
            Err(e) => Err(FeedbackError::Io {
                action: "use",
                path: self.record.path().to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// A write to the record, off the async workers like every record
    /// call; its failure is logged, never fatal: the user still gets an answer.
    async fn store<F>(&self, f: F)
    where
        F: FnOnce(&Record) -> Result<(), FeedbackError> + Send + 'static,
    {
        if let Err(e) = self.blocking(f).await {
            tracing::error!(error = %e, "cannot write the routing record");
        }
    }
}

fn ignored(outcome: &FlagOutcome) -> &'static str {
    match outcome {
        FlagOutcome::Recorded(_) => "recorded",
        FlagOutcome::Agrees => "agrees with the route",
        FlagOutcome::Duplicate => "already flagged",
        FlagOutcome::NotOurReply => "not a routed reply",
        FlagOutcome::ExplicitRequest => "an explicit /draw",
    }
}

/// A plain answer for a chat correction when no chat backend wrote one:
/// any text that is not a call teaches the route.
pub fn plain_fallback(text: &str) -> &'static str {
    if text.chars().any(is_cjk) {
        "好的，我們用文字聊聊這個。"
    } else {
        "Sure, let's talk about it."
    }
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_tells_once_per_window_then_recovers() {
        let mut l = RateLimiter::new(2);
        let t0 = Instant::now();
        assert_eq!(l.check(1, t0), Verdict::Allowed);
        assert_eq!(l.check(1, t0), Verdict::Allowed);
        assert_eq!(l.check(1, t0), Verdict::LimitedTell);
        assert_eq!(
            l.check(1, t0 + Duration::from_secs(1)),
            Verdict::LimitedQuiet
        );
        // Another user is not affected.
        assert_eq!(l.check(2, t0), Verdict::Allowed);
        // A minute after the first message, one slot frees up.
        assert_eq!(l.check(1, t0 + Duration::from_secs(60)), Verdict::Allowed);
        assert_eq!(l.check(1, t0 + Duration::from_secs(60)), Verdict::Allowed);
        assert_eq!(
            l.check(1, t0 + Duration::from_secs(61)),
            Verdict::LimitedTell
        );
        assert_eq!(RateLimiter::new(0).check(1, t0), Verdict::Allowed);
    }

    #[test]
    fn cutting_never_splits_a_character() {
        assert_eq!(cut_chars("畫一隻貓🐱", 4), "畫一隻貓");
        assert_eq!(cut_chars("abc", 10), "abc");
        assert_eq!(cut_chars("", 0), "");
    }

    #[test]
    fn fallback_follows_the_script() {
        assert!(plain_fallback("這張圖是誰拍的").starts_with("好的"));
        assert!(plain_fallback("who took this").starts_with("Sure"));
    }
}
