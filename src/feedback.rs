//! What the bot remembers about its routing, and what moderators teach it.
//!
//! Two stores with different jobs:
//! - [`Record`]: every routing decision and every moderator flag, in SQLite.
//!   It answers "which message was this reply for, and how was it routed?"
//!   when a reaction arrives, possibly days and restarts later, and it decides
//!   whether a flag counts (first live flag per decision wins).
//! - [`JsonlLog`] (typed as [`FeedbackLog`] and [`ReportLog`]): append-only
//!   JSONL files. Feedback rows are in the training schema of
//!   [`crate::dataset`], so `train` reads them as they are; a retraction is
//!   appended as a row with `meta.retracted = true`, never by editing the
//!   file, because other processes may be reading or appending at the same
//!   time.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dataset::Message;

/// Everything that can go wrong in the record or the logs.
#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// A file or directory could not be created, read, locked or written.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// SQLite refused an operation on the routing record.
    #[error("routing record {path}: {action}: {source}")]
    Sql {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    /// The record was written by a newer build, whose schema this one does not know.
    #[error("routing record {path} has schema version {found}; this build knows versions up to {supported}")]
    Schema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// `set_reply` named a user message that has no decision.
    #[error("routing record {path}: no decision for user message {user_message_id}")]
    UnknownMessage { path: PathBuf, user_message_id: u64 },

    /// A row could not be serialized, or a log line does not parse.
    #[error("{path}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Json {
        path: PathBuf,
        line: Option<usize>,
        message: String,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FeedbackError {
    let path = path.to_path_buf();
    move |source| FeedbackError::Io {
        action,
        path,
        source,
    }
}

/// The route a decision took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    Image,
    Chat,
}

impl RouteKind {
    /// The name stored in SQLite and written to JSONL.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Image => "image",
            RouteKind::Chat => "chat",
        }
    }
}

/// Who asked for the answer: only routed answers can be routed wrongly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The router decided.
    Router,
    /// An explicit `/draw`: the user chose the route, so a flag is never
    /// routing feedback.
    Draw,
    /// The local console (routed like Discord messages, useful for testing).
    Console,
}

impl Origin {
    /// The name stored in SQLite.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Router => "router",
            Origin::Draw => "draw",
            Origin::Console => "console",
        }
    }
}

fn bad_text(what: &str, found: &str) -> FromSqlError {
    FromSqlError::Other(format!("unknown {what} `{found}`").into())
}

impl ToSql for RouteKind {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for RouteKind {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_str()? {
            "image" => Ok(RouteKind::Image),
            "chat" => Ok(RouteKind::Chat),
            other => Err(bad_text("route", other)),
        }
    }
}

impl ToSql for Origin {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for Origin {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value.as_str()? {
            "router" => Ok(Origin::Router),
            "draw" => Ok(Origin::Draw),
            "console" => Ok(Origin::Console),
            other => Err(bad_text("origin", other)),
        }
    }
}

/// One routing decision, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionRow {
    /// The user's message: the key, since each message is routed once.
    pub user_message_id: u64,
    /// The bot's (first) reply; known only after sending, see [`Record::set_reply`].
    pub reply_message_id: Option<u64>,
    /// `None` in direct messages.
    pub guild_id: Option<u64>,
    pub channel_id: u64,
    pub author_id: u64,
    /// The text the router saw: the input of a training row.
    pub text: String,
    pub route: RouteKind,
    /// The image prompt, for image routes.
    pub prompt: Option<String>,
    /// The resolved adapter directory that decided it (`None`: the bare model),
    /// so flags can be traced to the adapter version that erred.
    pub adapter: Option<String>,
    pub latency_ms: f64,
    pub created_at_ms: i64,
    pub origin: Origin,
}

/// What a moderator's flag did.
#[derive(Debug, Clone, PartialEq)]
pub enum FlagOutcome {
    /// A new live flag: append a feedback row for this decision.
    Recorded(DecisionRow),
    /// The flag asks for the route that was taken: nothing to correct.
    Agrees,
    /// The decision already has a live flag (the first flag wins).
    Duplicate,
    /// The message is not a reply of ours (or predates the record).
    NotOurReply,
    /// The answer came from an explicit `/draw`: not a routing decision.
    ExplicitRequest,
}

/// Counters for a `/stats` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stats {
    /// Messages the router decided (origin Router or Console).
    pub routed: u64,
    /// Routed messages per route.
    pub image: u64,
    pub chat: u64,
    /// Explicit `/draw` requests (not routed, not counted above).
    pub explicit: u64,
    /// Flags in force now.
    pub live_flags: u64,
    /// Flags ever recorded, retracted ones included.
    pub flags_recorded: u64,
    /// Median routing latency of routed messages.
    pub median_latency_ms: Option<f64>,
    /// The adapter of the most recent routed message (`None`: none routed
    /// yet, or the bare model decided).
    pub last_adapter: Option<String>,
}

/// Schema migrations; `PRAGMA user_version` is the number applied so far.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE decisions (
    user_message_id  INTEGER PRIMARY KEY,
    reply_message_id INTEGER,
    guild_id         INTEGER,
    channel_id       INTEGER NOT NULL,
    author_id        INTEGER NOT NULL,
    text             TEXT NOT NULL,
    route            TEXT NOT NULL,
    prompt           TEXT,
    adapter          TEXT,
    latency_ms       REAL NOT NULL,
    created_at_ms    INTEGER NOT NULL,
    origin           TEXT NOT NULL
);
-- Every message sent for a decision (a long answer is split over several),
-- so a reaction on any part finds it.
CREATE TABLE replies (
    reply_message_id INTEGER PRIMARY KEY,
    user_message_id  INTEGER NOT NULL
);
CREATE TABLE flags (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_message_id  INTEGER NOT NULL,
    reply_message_id INTEGER NOT NULL,
    flagger_id       INTEGER NOT NULL,
    target           TEXT NOT NULL,
    flagged_at_ms    INTEGER NOT NULL,
    retracted_at_ms  INTEGER
);
-- At most one live flag per decision, even with several bot processes.
CREATE UNIQUE INDEX flags_one_live ON flags(user_message_id) WHERE retracted_at_ms IS NULL;
CREATE INDEX decisions_created ON decisions(created_at_ms);
",
    "
-- The corrected answer is stored with the claim, and each training row
-- (the flag's, then its retraction's) is marked once it is in the feedback
-- file: a crash between claim and append is repaired at start-up.
ALTER TABLE flags ADD COLUMN corrected TEXT NOT NULL DEFAULT '';
ALTER TABLE flags ADD COLUMN row_written INTEGER NOT NULL DEFAULT 1;
ALTER TABLE flags ADD COLUMN retraction_written INTEGER NOT NULL DEFAULT 1;
",
];

/// A training row the record has claimed but the feedback file may lack.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    pub decision: DecisionRow,
    pub flagger_id: u64,
    pub target: RouteKind,
    pub corrected: String,
    /// When the row happened: the flag's time, or the retraction's.
    pub time_ms: i64,
    pub retraction: bool,
}

impl PendingRow {
    /// The row as it goes to the feedback file.
    pub fn row(&self) -> FeedbackRow {
        FeedbackRow::new(
            &self.decision,
            self.corrected.clone(),
            self.target,
            self.flagger_id,
            self.time_ms,
            self.retraction,
        )
    }
}

/// The checks of a flag, in order: not our reply, an explicit `/draw`, a
/// live flag already, agrees with the route. `Ok` carries the decision.
fn flag_check(
    conn: &Connection,
    reply_message_id: u64,
    target: RouteKind,
) -> rusqlite::Result<Result<DecisionRow, FlagOutcome>> {
    let Some(decision) = decision_by_reply(conn, reply_message_id)? else {
        return Ok(Err(FlagOutcome::NotOurReply));
    };
    if decision.origin == Origin::Draw {
        return Ok(Err(FlagOutcome::ExplicitRequest));
    }
    let live: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM flags WHERE user_message_id = ?1 AND retracted_at_ms IS NULL)",
        [sql_id(decision.user_message_id)],
        |r| r.get(0),
    )?;
    if live {
        return Ok(Err(FlagOutcome::Duplicate));
    }
    if target == decision.route {
        return Ok(Err(FlagOutcome::Agrees));
    }
    Ok(Ok(decision))
}

/// Discord ids are u64 and SQLite integers i64: store the same 64 bits.
/// Snowflakes stay below 2^63 until the 2080s, so ordering survives too.
fn sql_id(id: u64) -> i64 {
    id as i64
}

fn from_sql_id(id: i64) -> u64 {
    id as u64
}

const DECISION_COLUMNS: &str = "d.user_message_id, d.reply_message_id, d.guild_id, d.channel_id, \
     d.author_id, d.text, d.route, d.prompt, d.adapter, d.latency_ms, d.created_at_ms, d.origin";

fn decision_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DecisionRow> {
    Ok(DecisionRow {
        user_message_id: from_sql_id(row.get(0)?),
        reply_message_id: row.get::<_, Option<i64>>(1)?.map(from_sql_id),
        guild_id: row.get::<_, Option<i64>>(2)?.map(from_sql_id),
        channel_id: from_sql_id(row.get(3)?),
        author_id: from_sql_id(row.get(4)?),
        text: row.get(5)?,
        route: row.get(6)?,
        prompt: row.get(7)?,
        adapter: row.get(8)?,
        latency_ms: row.get(9)?,
        created_at_ms: row.get(10)?,
        origin: row.get(11)?,
    })
}

fn decision_by_reply(
    conn: &Connection,
    reply_message_id: u64,
) -> rusqlite::Result<Option<DecisionRow>> {
    conn.query_row(
        &format!(
            "SELECT {DECISION_COLUMNS} FROM replies r JOIN decisions d USING (user_message_id) \
             WHERE r.reply_message_id = ?1"
        ),
        [sql_id(reply_message_id)],
        decision_from_row,
    )
    .optional()
}

fn decision_by_user(
    conn: &Connection,
    user_message_id: u64,
) -> rusqlite::Result<Option<DecisionRow>> {
    conn.query_row(
        &format!("SELECT {DECISION_COLUMNS} FROM decisions d WHERE d.user_message_id = ?1"),
        [sql_id(user_message_id)],
        decision_from_row,
    )
    .optional()
}

/// The routing record: decisions and flags in one SQLite file that survives
/// restarts.
///
/// Cheap to clone and shareable between tasks and threads: every clone uses
/// the same connection behind a mutex. Each call is one short transaction
/// (well under a millisecond on a local disk), so async callers may either
/// accept that brief block or wrap calls in `tokio::task::spawn_blocking`;
/// the latter is the safe choice when the disk may be slow or another
/// process holds the database lock (calls then wait up to the busy timeout).
#[derive(Debug, Clone)]
pub struct Record {
    inner: Arc<RecordInner>,
}

#[derive(Debug)]
struct RecordInner {
    /// For error messages: the person fixing it needs the file.
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// How long a call waits for another process's write transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

impl Record {
    /// Opens (creating it and its parent directories if needed) the record at
    /// `path`, and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Record, FeedbackError> {
        create_parent(path)?;
        let sql = |action| {
            let path = path.to_path_buf();
            move |source| FeedbackError::Sql {
                action,
                path,
                source,
            }
        };
        let mut conn = Connection::open(path).map_err(sql("open"))?;
        // First, so that everything below waits for other processes instead
        // of failing with SQLITE_BUSY.
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql("set busy_timeout"))?;
        // WAL: readers never block the writer, and a crash never corrupts.
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql("enable WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(path = %path.display(), mode, "routing record is not in WAL mode");
        }
        // NORMAL is durable across process crashes in WAL mode; only a power
        // loss may drop the last transactions, which is fine for this record.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("set synchronous"))?;
        migrate(&mut conn, path)?;
        Ok(Record {
            inner: Arc::new(RecordInner {
                path: path.to_path_buf(),
                conn: Mutex::new(conn),
            }),
        })
    }

    /// The file this record lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written
        // (an open transaction rolls back on drop), so the connection is
        // still good.
        self.inner.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sql(&self, action: &'static str) -> impl FnOnce(rusqlite::Error) -> FeedbackError + '_ {
        move |source| FeedbackError::Sql {
            action,
            path: self.inner.path.clone(),
            source,
        }
    }

    /// Records a decision. A second decision for the same user message
    /// (re-routed after an edit) replaces the first but keeps a known reply.
    pub fn insert_decision(&self, row: &DecisionRow) -> Result<(), FeedbackError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.sql("begin"))?;
        tx.execute(
            "INSERT INTO decisions (user_message_id, reply_message_id, guild_id, channel_id, \
             author_id, text, route, prompt, adapter, latency_ms, created_at_ms, origin) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) \
             ON CONFLICT (user_message_id) DO UPDATE SET \
             reply_message_id = COALESCE(excluded.reply_message_id, reply_message_id), \
             guild_id = excluded.guild_id, channel_id = excluded.channel_id, \
             author_id = excluded.author_id, text = excluded.text, route = excluded.route, \
             prompt = excluded.prompt, adapter = excluded.adapter, \
             latency_ms = excluded.latency_ms, created_at_ms = excluded.created_at_ms, \
             origin = excluded.origin",
            params![
                sql_id(row.user_message_id),
                row.reply_message_id.map(sql_id),
                row.guild_id.map(sql_id),
                sql_id(row.channel_id),
                sql_id(row.author_id),
                row.text,
                row.route,
                row.prompt,
                row.adapter,
                row.latency_ms,
                row.created_at_ms,
                row.origin,
            ],
        )
        .map_err(self.sql("insert decision"))?;
        if let Some(reply) = row.reply_message_id {
            tx.execute(
                "INSERT OR REPLACE INTO replies (reply_message_id, user_message_id) VALUES (?1, ?2)",
                params![sql_id(reply), sql_id(row.user_message_id)],
            )
            .map_err(self.sql("insert reply"))?;
        }
        tx.commit().map_err(self.sql("commit decision"))
    }

    /// Links a sent message to its decision. Call it for every message sent
    /// for that decision (a long answer split in parts): a flag on any part
    /// finds the decision; the first part is the decision's `reply_message_id`.
    pub fn set_reply(
        &self,
        user_message_id: u64,
        reply_message_id: u64,
    ) -> Result<(), FeedbackError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.sql("begin"))?;
        let changed = tx
            .execute(
                "UPDATE decisions SET reply_message_id = COALESCE(reply_message_id, ?2) \
                 WHERE user_message_id = ?1",
                params![sql_id(user_message_id), sql_id(reply_message_id)],
            )
            .map_err(self.sql("set reply"))?;
        if changed == 0 {
            return Err(FeedbackError::UnknownMessage {
                path: self.inner.path.clone(),
                user_message_id,
            });
        }
        tx.execute(
            "INSERT OR REPLACE INTO replies (reply_message_id, user_message_id) VALUES (?1, ?2)",
            params![sql_id(reply_message_id), sql_id(user_message_id)],
        )
        .map_err(self.sql("insert reply"))?;
        tx.commit().map_err(self.sql("commit reply"))
    }

    /// The decision a bot message answered, if it is one of ours.
    pub fn by_reply(&self, reply_message_id: u64) -> Result<Option<DecisionRow>, FeedbackError> {
        decision_by_reply(&self.conn(), reply_message_id).map_err(self.sql("find by reply"))
    }

    /// The decision taken for a user message.
    pub fn by_user_message(
        &self,
        user_message_id: u64,
    ) -> Result<Option<DecisionRow>, FeedbackError> {
        decision_by_user(&self.conn(), user_message_id).map_err(self.sql("find by user message"))
    }

    /// What [`Record::flag`] would answer now, without recording anything
    /// (so that the costly corrected answer is made only for a real flag).
    pub fn preview_flag(
        &self,
        reply_message_id: u64,
        target: RouteKind,
    ) -> Result<FlagOutcome, FeedbackError> {
        let conn = self.conn();
        match flag_check(&conn, reply_message_id, target).map_err(self.sql("check flag"))? {
            Ok(decision) => Ok(FlagOutcome::Recorded(decision)),
            Err(outcome) => Ok(outcome),
        }
    }

    /// A flag on a reply: returns what happened. Recorded only when the reply
    /// is in the record, its origin is Router or Console, the target differs
    /// from the route, and no live flag exists for that decision (whoever
    /// flagged first wins; a second flag, by the same or another moderator,
    /// for either target, is `Duplicate`). After a retraction
    /// ([`Record::unflag`]) a new flag is recorded again. `corrected` is the
    /// training row's answer, kept so that the row can be written again
    /// after a crash; call [`Record::row_written`] once it is in the file.
    pub fn flag(
        &self,
        reply_message_id: u64,
        flagger_id: u64,
        target: RouteKind,
        now_ms: i64,
        corrected: &str,
    ) -> Result<FlagOutcome, FeedbackError> {
        let mut conn = self.conn();
        // IMMEDIATE: take the write lock before reading, so two processes
        // cannot both see "no live flag" and both record one.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        let decision =
            match flag_check(&tx, reply_message_id, target).map_err(self.sql("check flag"))? {
                Ok(d) => d,
                Err(outcome) => return Ok(outcome),
            };
        tx.execute(
            "INSERT INTO flags (user_message_id, reply_message_id, flagger_id, target, flagged_at_ms, \
             corrected, row_written) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0)",
            params![
                sql_id(decision.user_message_id),
                sql_id(reply_message_id),
                sql_id(flagger_id),
                target,
                now_ms,
                corrected
            ],
        )
        .map_err(self.sql("insert flag"))?;
        tx.commit().map_err(self.sql("commit flag"))?;
        Ok(FlagOutcome::Recorded(decision))
    }

    /// Removing the reaction: retracts the live flag when it was set by
    /// `flagger_id` with that target, and returns the decision and the
    /// flag's corrected answer so the caller can append the retraction row
    /// (then [`Record::row_written`]). Anyone else's removal does nothing.
    pub fn unflag(
        &self,
        reply_message_id: u64,
        flagger_id: u64,
        target: RouteKind,
        now_ms: i64,
    ) -> Result<Option<(DecisionRow, String)>, FeedbackError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.sql("begin"))?;
        let Some(decision) =
            decision_by_reply(&tx, reply_message_id).map_err(self.sql("find by reply"))?
        else {
            return Ok(None);
        };
        let corrected: Option<String> = tx
            .query_row(
                "UPDATE flags SET retracted_at_ms = ?4, retraction_written = 0 \
                 WHERE user_message_id = ?1 AND flagger_id = ?2 AND target = ?3 \
                 AND retracted_at_ms IS NULL RETURNING corrected",
                params![
                    sql_id(decision.user_message_id),
                    sql_id(flagger_id),
                    target,
                    now_ms
                ],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("retract flag"))?;
        let Some(corrected) = corrected else {
            return Ok(None);
        };
        tx.commit().map_err(self.sql("commit retraction"))?;
        Ok(Some((decision, corrected)))
    }

    /// Marks a training row as written to the feedback file: the flag on
    /// `user_message_id` made at `at_ms`, or with `retraction` the
    /// retraction made at `at_ms`.
    pub fn row_written(
        &self,
        user_message_id: u64,
        at_ms: i64,
        retraction: bool,
    ) -> Result<(), FeedbackError> {
        let (column, when) = if retraction {
            ("retraction_written", "retracted_at_ms")
        } else {
            ("row_written", "flagged_at_ms")
        };
        self.conn()
            .execute(
                &format!(
                    "UPDATE flags SET {column} = 1 WHERE user_message_id = ?1 AND {when} = ?2"
                ),
                params![sql_id(user_message_id), at_ms],
            )
            .map_err(self.sql("mark row written"))?;
        Ok(())
    }

    /// Training rows claimed in the record but not (known to be) in the
    /// feedback file: what a crash between claim and append left behind.
    pub fn unwritten_rows(&self) -> Result<Vec<PendingRow>, FeedbackError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {DECISION_COLUMNS}, f.flagger_id, f.target, f.corrected, f.flagged_at_ms, \
                 f.retracted_at_ms, f.row_written, f.retraction_written \
                 FROM flags f JOIN decisions d USING (user_message_id) \
                 WHERE f.row_written = 0 OR f.retraction_written = 0 ORDER BY f.id"
            ))
            .map_err(self.sql("list unwritten rows"))?;
        let flags = stmt
            .query_map([], |r| {
                Ok((
                    decision_from_row(r)?,
                    from_sql_id(r.get(12)?),
                    r.get::<_, RouteKind>(13)?,
                    r.get::<_, String>(14)?,
                    r.get::<_, i64>(15)?,
                    r.get::<_, Option<i64>>(16)?,
                    r.get::<_, bool>(17)?,
                    r.get::<_, bool>(18)?,
                ))
            })
            .map_err(self.sql("list unwritten rows"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.sql("list unwritten rows"))?;
        let mut out = Vec::new();
        for (decision, flagger_id, target, corrected, at, retracted_at, row_ok, retraction_ok) in
            flags
        {
            let pending = |time_ms, retraction| PendingRow {
                decision: decision.clone(),
                flagger_id,
                target,
                corrected: corrected.clone(),
                time_ms,
                retraction,
            };
            if !row_ok {
                out.push(pending(at, false));
            }
            if let (Some(when), false) = (retracted_at, retraction_ok) {
                out.push(pending(when, true));
            }
        }
        Ok(out)
    }

    /// Counters over the whole record.
    pub fn stats(&self) -> Result<Stats, FeedbackError> {
        let mut conn = self.conn();
        // One read transaction: all counters describe the same moment.
        let tx = conn.transaction().map_err(self.sql("begin"))?;
        let (routed, image, chat, explicit): (i64, i64, i64, i64) = tx
            .query_row(
                "SELECT COALESCE(SUM(origin != 'draw'), 0), \
                 COALESCE(SUM(origin != 'draw' AND route = 'image'), 0), \
                 COALESCE(SUM(origin != 'draw' AND route = 'chat'), 0), \
                 COALESCE(SUM(origin = 'draw'), 0) FROM decisions",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .map_err(self.sql("count decisions"))?;
        let (flags_recorded, live_flags): (i64, i64) = tx
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(retracted_at_ms IS NULL), 0) FROM flags",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(self.sql("count flags"))?;
        let median_latency_ms = if routed == 0 {
            None
        } else {
            // The middle value, or the mean of the two middle values.
            let mut stmt = tx
                .prepare(
                    "SELECT latency_ms FROM decisions WHERE origin != 'draw' \
                     ORDER BY latency_ms LIMIT ?1 OFFSET ?2",
                )
                .map_err(self.sql("median latency"))?;
            let middle = stmt
                .query_map([2 - routed % 2, (routed - 1) / 2], |r| r.get::<_, f64>(0))
                .map_err(self.sql("median latency"))?
                .collect::<rusqlite::Result<Vec<f64>>>()
                .map_err(self.sql("median latency"))?;
            (!middle.is_empty()).then(|| middle.iter().sum::<f64>() / middle.len() as f64)
        };
        let last_adapter = tx
            .query_row(
                "SELECT adapter FROM decisions WHERE origin != 'draw' \
                 ORDER BY created_at_ms DESC, user_message_id DESC LIMIT 1",
                [],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map_err(self.sql("last adapter"))?
            .flatten();
        Ok(Stats {
            routed: routed as u64,
            image: image as u64,
            chat: chat as u64,
            explicit: explicit as u64,
            live_flags: live_flags as u64,
            flags_recorded: flags_recorded as u64,
            median_latency_ms,
            last_adapter,
        })
    }
}

/// Applies the migrations this file has not seen, in one transaction so that
/// two processes opening a new file at once cannot both create the schema.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), FeedbackError> {
    let sql = |action| {
        let path = path.to_path_buf();
        move |source| FeedbackError::Sql {
            action,
            path,
            source,
        }
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql("begin migration"))?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read user_version"))?;
    let supported = MIGRATIONS.len() as i64;
    if version > supported {
        return Err(FeedbackError::Schema {
            path: path.to_path_buf(),
            found: version,
            supported,
        });
    }
    for migration in &MIGRATIONS[version as usize..] {
        tx.execute_batch(migration).map_err(sql("migrate schema"))?;
    }
    if version < supported {
        tx.pragma_update(None, "user_version", supported)
            .map_err(sql("write user_version"))?;
    }
    tx.commit().map_err(sql("commit migration"))
}

fn create_parent(path: &Path) -> Result<(), FeedbackError> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))
        }
        _ => Ok(()),
    }
}

/// Discord ids as JSON strings: snowflakes exceed the 2^53 integers that
/// JavaScript (and many JSON tools) read exactly. Numbers are accepted on
/// input too.
mod id_string {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(u64),
    }

    impl Raw {
        fn id<E: serde::de::Error>(self) -> Result<u64, E> {
            match self {
                Raw::Text(s) => s
                    .parse()
                    .map_err(|_| E::custom(format!("`{s}` is not a Discord id"))),
                Raw::Number(n) => Ok(n),
            }
        }
    }

    pub fn serialize<S: Serializer>(id: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(id)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        Raw::deserialize(d)?.id()
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(id: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match id {
                Some(id) => s.collect_str(id),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            Option::<Raw>::deserialize(d)?
                .map(Raw::id::<D::Error>)
                .transpose()
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for milliseconds since the Unix epoch.
pub fn rfc3339_utc(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms_of_day = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let secs = ms_of_day / 1000;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms_of_day % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after
/// Howard Hinnant's `civil_from_days`: shift the year to start in March so
/// the leap day is last, then split into 400-year eras.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One training row: the user's text and the answer the router should have
/// given, in the [`crate::dataset`] schema, plus where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRow {
    pub messages: Vec<Message>,
    pub meta: FeedbackMeta,
}

/// The `meta` object of a feedback row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackMeta {
    /// `discord` (or `console` for `bot console`), to tell these rows from curated data.
    pub source: String,
    #[serde(with = "id_string::option", default)]
    pub guild_id: Option<u64>,
    #[serde(with = "id_string")]
    pub channel_id: u64,
    #[serde(with = "id_string")]
    pub user_message_id: u64,
    #[serde(with = "id_string::option", default)]
    pub reply_message_id: Option<u64>,
    #[serde(with = "id_string")]
    pub flagger_id: u64,
    pub original_route: RouteKind,
    pub corrected_route: RouteKind,
    /// The adapter that made the mistake.
    pub adapter: Option<String>,
    /// RFC 3339, UTC.
    pub time: String,
    /// A retraction: `train` drops the earlier row it undoes and never
    /// trains on this one.
    pub retracted: bool,
}

impl FeedbackRow {
    /// The row for a flag (or, with `retracted`, for its retraction).
    /// `corrected_answer` is what the router should have said: the rendered
    /// call ([`crate::prompt::render_call`]) for `Image`, a chat answer for `Chat`.
    pub fn new(
        decision: &DecisionRow,
        corrected_answer: String,
        corrected: RouteKind,
        flagger_id: u64,
        now_ms: i64,
        retracted: bool,
    ) -> FeedbackRow {
        FeedbackRow {
            messages: vec![
                Message {
                    role: "user".into(),
                    content: decision.text.clone(),
                },
                Message {
                    role: "assistant".into(),
                    content: corrected_answer,
                },
            ],
            meta: FeedbackMeta {
                source: match decision.origin {
                    Origin::Console => "console",
                    _ => "discord",
                }
                .into(),
                guild_id: decision.guild_id,
                channel_id: decision.channel_id,
                user_message_id: decision.user_message_id,
                reply_message_id: decision.reply_message_id,
                flagger_id,
                original_route: decision.route,
                corrected_route: corrected,
                adapter: decision.adapter.clone(),
                time: rfc3339_utc(now_ms),
                retracted,
            },
        }
    }
}

/// A flag by someone who is not a moderator: not training data, but counted
/// so moderators can review the reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportRow {
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(with = "id_string::option", default)]
    pub guild_id: Option<u64>,
    #[serde(with = "id_string")]
    pub channel_id: u64,
    #[serde(with = "id_string")]
    pub reply_message_id: u64,
    /// Who reported it.
    #[serde(with = "id_string")]
    pub user_id: u64,
    /// The route the reporter asked for.
    pub target: RouteKind,
    /// The original user text, so the review needs no lookup.
    pub text: String,
}

impl ReportRow {
    /// A report by `user_id` on the bot message `reply_message_id` (any part
    /// of the answer to `decision`).
    pub fn new(
        decision: &DecisionRow,
        reply_message_id: u64,
        user_id: u64,
        target: RouteKind,
        now_ms: i64,
    ) -> ReportRow {
        ReportRow {
            time: rfc3339_utc(now_ms),
            guild_id: decision.guild_id,
            channel_id: decision.channel_id,
            reply_message_id,
            user_id,
            target,
            text: decision.text.clone(),
        }
    }
}

/// An append-only JSONL file, safe to share between threads and processes.
///
/// Every append opens the path afresh (a log moved away for training is
/// recreated, never written through a stale handle), takes an exclusive
/// advisory lock, and writes the whole line in one `write_all` followed by
/// `sync_data`. Writers that crash mid-line leave a torn tail; the next
/// open or append moves it to `<file>.torn` before writing, so readers only
/// ever see whole lines and nothing is silently lost.
#[derive(Debug, Clone)]
pub struct JsonlLog {
    path: PathBuf,
}

impl JsonlLog {
    /// Opens (creating it and its parent directories) the log at `path`,
    /// repairing a torn tail.
    pub fn open(path: &Path) -> Result<JsonlLog, FeedbackError> {
        create_parent(path)?;
        let mut file = open_for_append(path)?;
        file.lock().map_err(io_err("lock", path))?;
        let repaired = repair_tail(&mut file, path);
        let unlocked = file.unlock().map_err(io_err("unlock", path));
        repaired?;
        unlocked?;
        Ok(JsonlLog {
            path: path.to_path_buf(),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one row as one line; returns once it is on disk.
    pub fn append<T: Serialize>(&self, row: &T) -> Result<(), FeedbackError> {
        // Serialize before locking: the lock is held only for the write.
        // Compact JSON escapes every newline, so the row is exactly one line.
        let mut line = serde_json::to_vec(row).map_err(|e| FeedbackError::Json {
            path: self.path.clone(),
            line: None,
            message: format!("cannot serialize row: {e}"),
        })?;
        line.push(b'\n');
        let mut file = open_for_append(&self.path)?;
        file.lock().map_err(io_err("lock", &self.path))?;
        let written = write_line(&mut file, &self.path, &line);
        let unlocked = file.unlock().map_err(io_err("unlock", &self.path));
        written?;
        unlocked
    }

    /// Reads every row (blank lines skipped), under a shared lock so no
    /// half-written line is seen.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Vec<T>, FeedbackError> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("open", &self.path)(e)),
        };
        file.lock_shared().map_err(io_err("lock", &self.path))?;
        let mut text = String::new();
        let read = file
            .read_to_string(&mut text)
            .map_err(io_err("read", &self.path));
        let unlocked = file.unlock().map_err(io_err("unlock", &self.path));
        read?;
        unlocked?;
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            rows.push(serde_json::from_str(line).map_err(|e| FeedbackError::Json {
                path: self.path.clone(),
                line: Some(i + 1),
                message: e.to_string(),
            })?);
        }
        Ok(rows)
    }
}

fn open_for_append(path: &Path) -> Result<File, FeedbackError> {
    // Append mode: every write lands at the end as it is at that moment,
    // whatever other processes did since we opened.
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err("open", path))
}

/// Writes `line` at the end; the caller holds the exclusive lock.
fn write_line(file: &mut File, path: &Path, line: &[u8]) -> Result<(), FeedbackError> {
    repair_tail(file, path)?;
    let before = file.metadata().map_err(io_err("stat", path))?.len();
    if let Err(e) = file.write_all(line) {
        // A partial write (disk full) would glue the next row onto this
        // fragment: cut it off while we still hold the lock.
        if let Err(cut) = file.set_len(before) {
            tracing::warn!(path = %path.display(), error = %cut, "cannot remove a partly written line");
        }
        return Err(io_err("write", path)(e));
    }
    file.sync_data().map_err(io_err("sync", path))
}

/// Moves a partial last line (no final newline: a writer crashed mid-line)
/// to `<path>.torn` and truncates it away. The caller holds the exclusive lock.
fn repair_tail(file: &mut File, path: &Path) -> Result<(), FeedbackError> {
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len == 0 || read_at(file, path, len - 1, 1)? == b"\n" {
        return Ok(());
    }
    // Find where the partial line starts, scanning back in blocks.
    const BLOCK: u64 = 64 * 1024;
    let mut start = 0;
    let mut end = len;
    while end > 0 {
        let from = end.saturating_sub(BLOCK);
        let block = read_at(file, path, from, (end - from) as usize)?;
        if let Some(i) = block.iter().rposition(|&b| b == b'\n') {
            start = from + i as u64 + 1;
            break;
        }
        end = from;
    }
    let mut partial = read_at(file, path, start, (len - start) as usize)?;
    partial.push(b'\n');
    let mut torn_path = path.as_os_str().to_owned();
    torn_path.push(".torn");
    let torn_path = PathBuf::from(torn_path);
    // Save the fragment before cutting it: a crash in between leaves it in
    // both places, never in neither.
    let mut torn = OpenOptions::new()
        .append(true)
        .create(true)
        .open(&torn_path)
        .map_err(io_err("open", &torn_path))?;
    torn.write_all(&partial)
        .map_err(io_err("write", &torn_path))?;
    torn.sync_data().map_err(io_err("sync", &torn_path))?;
    file.set_len(start).map_err(io_err("truncate", path))?;
    file.sync_data().map_err(io_err("sync", path))?;
    tracing::warn!(
        path = %path.display(),
        torn = %torn_path.display(),
        bytes = len - start,
        "moved a partial last line (a writer crashed mid-line) out of the log"
    );
    Ok(())
}

fn read_at(
    file: &mut File,
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, FeedbackError> {
    let mut buf = vec![0; len];
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seek", path))?;
    file.read_exact(&mut buf).map_err(io_err("read", path))?;
    Ok(buf)
}

/// The training-row log read by `train` (`datas/feedback/*.jsonl`).
#[derive(Debug, Clone)]
pub struct FeedbackLog(JsonlLog);

impl FeedbackLog {
    /// Opens the log at `path`, see [`JsonlLog::open`].
    pub fn open(path: &Path) -> Result<FeedbackLog, FeedbackError> {
        JsonlLog::open(path).map(FeedbackLog)
    }

    /// Appends a flag's (or a retraction's) row.
    pub fn append(&self, row: &FeedbackRow) -> Result<(), FeedbackError> {
        self.0.append(row)
    }

    /// The underlying log.
    pub fn log(&self) -> &JsonlLog {
        &self.0
    }
}

/// The log of non-moderators' flags, for moderators to review.
#[derive(Debug, Clone)]
pub struct ReportLog(JsonlLog);

impl ReportLog {
    /// Opens the log at `path`, see [`JsonlLog::open`].
    pub fn open(path: &Path) -> Result<ReportLog, FeedbackError> {
        JsonlLog::open(path).map(ReportLog)
    }

    /// Appends one report.
    pub fn append(&self, row: &ReportRow) -> Result<(), FeedbackError> {
        self.0.append(row)
    }

    /// Every report so far.
    pub fn rows(&self) -> Result<Vec<ReportRow>, FeedbackError> {
        self.0.read()
    }

    /// How many reports a bot message has had.
    pub fn count_for(&self, reply_message_id: u64) -> Result<usize, FeedbackError> {
        Ok(self
            .rows()?
            .iter()
            .filter(|r| r.reply_message_id == reply_message_id)
            .count())
    }

    /// The underlying log.
    pub fn log(&self) -> &JsonlLog {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(user: u64, route: RouteKind, origin: Origin) -> DecisionRow {
        DecisionRow {
            user_message_id: user,
            reply_message_id: None,
            guild_id: Some(1_234_567_890_123_456_789),
            channel_id: 42,
            author_id: 7,
            text: format!("message {user}"),
            route,
            prompt: (route == RouteKind::Image).then(|| "a cat".to_string()),
            adapter: Some("adapters/v3".into()),
            latency_ms: user as f64,
            created_at_ms: 1_700_000_000_000 + user as i64,
            origin,
        }
    }

    /// A decision with its reply `user + 1000` already sent.
    fn sent(record: &Record, user: u64, route: RouteKind, origin: Origin) -> DecisionRow {
        let row = decision(user, route, origin);
        record.insert_decision(&row).unwrap();
        record.set_reply(user, user + 1000).unwrap();
        DecisionRow {
            reply_message_id: Some(user + 1000),
            ..row
        }
    }

    #[test]
    fn decisions_round_trip_and_replies_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::open(&dir.path().join("deep/er/record.sqlite")).unwrap();
        let mut row = decision(u64::MAX - 5, RouteKind::Image, Origin::Router);
        row.guild_id = None;
        record.insert_decision(&row).unwrap();
        assert_eq!(
            record.by_user_message(row.user_message_id).unwrap(),
            Some(row.clone())
        );
        assert_eq!(record.by_reply(99).unwrap(), None);

        record.set_reply(row.user_message_id, 99).unwrap();
        // A long answer sent in two parts: both find the decision.
        record.set_reply(row.user_message_id, 100).unwrap();
        let want = DecisionRow {
            reply_message_id: Some(99),
            ..row.clone()
        };
        assert_eq!(record.by_reply(99).unwrap(), Some(want.clone()));
        assert_eq!(record.by_reply(100).unwrap(), Some(want.clone()));
        assert_eq!(
            record.by_user_message(row.user_message_id).unwrap(),
            Some(want)
        );

        let err = record.set_reply(5, 6).unwrap_err().to_string();
        assert!(
            err.contains("record.sqlite") && err.contains("user message 5"),
            "{err}"
        );
    }

    #[test]
    fn flag_state_machine() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::open(&dir.path().join("r.sqlite")).unwrap();
        let chat = sent(&record, 1, RouteKind::Chat, Origin::Router);
        let drawn = sent(&record, 2, RouteKind::Image, Origin::Draw);
        let console = sent(&record, 3, RouteKind::Image, Origin::Console);
        let (reply, mod_a, mod_b) = (1001, 10, 11);

        assert_eq!(
            record
                .flag(999, mod_a, RouteKind::Image, 5, "fixed")
                .unwrap(),
            FlagOutcome::NotOurReply
        );
        assert_eq!(
            record
                .flag(
                    drawn.reply_message_id.unwrap(),
                    mod_a,
                    RouteKind::Chat,
                    5,
                    "fixed"
                )
                .unwrap(),
            FlagOutcome::ExplicitRequest
        );
        assert_eq!(
            record
                .flag(reply, mod_a, RouteKind::Chat, 5, "fixed")
                .unwrap(),
            FlagOutcome::Agrees
        );
        assert_eq!(
            record
                .flag(reply, mod_a, RouteKind::Image, 5, "fixed")
                .unwrap(),
            FlagOutcome::Recorded(chat.clone())
        );
        // First flag wins: the same moderator again, another moderator, either target.
        assert_eq!(
            record
                .flag(reply, mod_a, RouteKind::Image, 6, "fixed")
                .unwrap(),
            FlagOutcome::Duplicate
        );
        assert_eq!(
            record
                .flag(reply, mod_b, RouteKind::Image, 6, "fixed")
                .unwrap(),
            FlagOutcome::Duplicate
        );
        assert_eq!(
            record
                .flag(reply, mod_b, RouteKind::Chat, 6, "fixed")
                .unwrap(),
            FlagOutcome::Duplicate
        );

        // Only the flagger, with the flagged target, retracts.
        assert_eq!(
            record.unflag(reply, mod_b, RouteKind::Image, 7).unwrap(),
            None
        );
        assert_eq!(
            record.unflag(reply, mod_a, RouteKind::Chat, 7).unwrap(),
            None
        );
        assert_eq!(
            record.unflag(999, mod_a, RouteKind::Image, 7).unwrap(),
            None
        );
        assert_eq!(
            record
                .flag(reply, mod_b, RouteKind::Image, 7, "fixed")
                .unwrap(),
            FlagOutcome::Duplicate
        );
        assert_eq!(
            record.unflag(reply, mod_a, RouteKind::Image, 8).unwrap(),
            Some((chat.clone(), "fixed".to_string()))
        );
        assert_eq!(
            record.unflag(reply, mod_a, RouteKind::Image, 8).unwrap(),
            None
        );

        // Retracted: a new flag counts again, by anyone.
        assert_eq!(
            record
                .flag(reply, mod_b, RouteKind::Image, 9, "fixed")
                .unwrap(),
            FlagOutcome::Recorded(chat)
        );
        assert_eq!(
            record
                .flag(
                    console.reply_message_id.unwrap(),
                    mod_a,
                    RouteKind::Chat,
                    9,
                    "fixed"
                )
                .unwrap(),
            FlagOutcome::Recorded(console)
        );

        let stats = record.stats().unwrap();
        assert_eq!((stats.live_flags, stats.flags_recorded), (2, 3));
    }

    #[test]
    fn stats_count_routes_flags_latency_and_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::open(&dir.path().join("r.sqlite")).unwrap();
        let empty = record.stats().unwrap();
        assert_eq!(empty.routed, 0);
        assert_eq!(empty.median_latency_ms, None);
        assert_eq!(empty.last_adapter, None);

        // Latency = id: routed 10, 20, 30, 40 -> median 25; /draw is left out.
        for (id, route) in [
            (10, RouteKind::Chat),
            (30, RouteKind::Image),
            (20, RouteKind::Chat),
        ] {
            sent(&record, id, route, Origin::Router);
        }
        sent(&record, 500, RouteKind::Image, Origin::Draw);
        let mut last = decision(40, RouteKind::Image, Origin::Console);
        last.adapter = Some("adapters/v4".into());
        record.insert_decision(&last).unwrap();
        record.set_reply(40, 1040).unwrap();
        record.flag(1010, 1, RouteKind::Image, 0, "fixed").unwrap();
        record.flag(1030, 1, RouteKind::Chat, 0, "fixed").unwrap();
        record.unflag(1030, 1, RouteKind::Chat, 1).unwrap();

        let s = record.stats().unwrap();
        assert_eq!((s.routed, s.image, s.chat, s.explicit), (4, 2, 2, 1));
        assert_eq!((s.live_flags, s.flags_recorded), (1, 2));
        assert_eq!(s.median_latency_ms, Some(25.0));
        assert_eq!(s.last_adapter.as_deref(), Some("adapters/v4"));

        sent(&record, 50, RouteKind::Chat, Origin::Router);
        assert_eq!(record.stats().unwrap().median_latency_ms, Some(30.0));
    }

    #[test]
    fn flags_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let chat = {
            let record = Record::open(&path).unwrap();
            let chat = sent(&record, 1, RouteKind::Chat, Origin::Router);
            sent(&record, 2, RouteKind::Image, Origin::Router);
            assert!(matches!(
                record.flag(1001, 10, RouteKind::Image, 5, "fixed").unwrap(),
                FlagOutcome::Recorded(_)
            ));
            chat
        };
        let record = Record::open(&path).unwrap();
        assert_eq!(record.by_reply(1001).unwrap(), Some(chat.clone()));
        assert_eq!(
            record.flag(1001, 11, RouteKind::Image, 6, "fixed").unwrap(),
            FlagOutcome::Duplicate
        );
        assert_eq!(
            record.flag(1002, 11, RouteKind::Chat, 6, "fixed").unwrap(),
            FlagOutcome::Recorded(record.by_user_message(2).unwrap().unwrap())
        );
        assert_eq!(
            record.unflag(1001, 10, RouteKind::Image, 7).unwrap(),
            Some((chat, "fixed".to_string()))
        );
        assert_eq!(record.stats().unwrap().live_flags, 1);
    }

    #[test]
    fn a_newer_schema_is_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        drop(Record::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = Record::open(&path).unwrap_err().to_string();
        assert!(err.contains("r.sqlite") && err.contains("99"), "{err}");
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, "x").unwrap();
        let err = Record::open(&file.join("r.sqlite"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain-file"), "{err}");
        let err = JsonlLog::open(&file.join("f.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain-file"), "{err}");
    }

    #[test]
    fn rfc3339_from_unix_ms() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_utc(951_868_799_999), "2000-02-29T23:59:59.999Z");
        assert_eq!(rfc3339_utc(4_107_542_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(rfc3339_utc(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        // Every day of 1968..2032 against a naive day counter.
        let (mut y, mut m, mut d) = (1968, 1, 1);
        for days in -731..22_645 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = [
                31,
                if leap { 29 } else { 28 },
                31,
                30,
                31,
                30,
                31,
                31,
                30,
                31,
                30,
                31,
            ];
            d += 1;
            if d > len[m as usize - 1] {
                (d, m) = (1, m + 1);
                if m > 12 {
                    (m, y) = (1, y + 1);
                }
            }
        }
    }

    #[test]
    fn feedback_rows_have_the_training_shape_and_string_ids() {
        let mut d = decision(1_234_567_890_123_456_789, RouteKind::Chat, Origin::Router);
        d.reply_message_id = Some(1_234_567_890_123_456_790);
        let row = FeedbackRow::new(
            &d,
            crate::prompt::render_call("a cat"),
            RouteKind::Image,
            9_007_199_254_740_993,
            1_700_000_000_000,
            false,
        );
        let json: serde_json::Value = serde_json::to_value(&row).unwrap();
        assert_eq!(json["messages"][0]["role"], "user");
        assert_eq!(json["messages"][0]["content"], d.text.as_str());
        assert_eq!(json["messages"][1]["role"], "assistant");
        let meta = &json["meta"];
        assert_eq!(meta["source"], "discord");
        assert_eq!(meta["guild_id"], "1234567890123456789");
        assert_eq!(meta["channel_id"], "42");
        assert_eq!(meta["user_message_id"], "1234567890123456789");
        assert_eq!(meta["reply_message_id"], "1234567890123456790");
        assert_eq!(meta["flagger_id"], "9007199254740993");
        assert_eq!(meta["original_route"], "chat");
        assert_eq!(meta["corrected_route"], "image");
        assert_eq!(meta["adapter"], "adapters/v3");
        assert_eq!(meta["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(meta["retracted"], false);

        // Appended through the log, `train`'s reader takes it as a call.
        let dir = tempfile::tempdir().unwrap();
        let log = FeedbackLog::open(&dir.path().join("feedback/f.jsonl")).unwrap();
        log.append(&row).unwrap();
        let back: Vec<FeedbackRow> = log.log().read().unwrap();
        assert_eq!(back, vec![row]);
        let examples = crate::dataset::read_jsonl(log.log().path()).unwrap();
        assert_eq!(examples.len(), 1);
        assert_eq!(examples[0].gold_prompt().as_deref(), Some("a cat"));
    }

    #[test]
    fn reports_are_counted_per_reply() {
        let dir = tempfile::tempdir().unwrap();
        let log = ReportLog::open(&dir.path().join("reports.jsonl")).unwrap();
        let d = decision(1, RouteKind::Chat, Origin::Router);
        for (reply, user) in [(1001, 5), (1001, 6), (1002, 5)] {
            log.append(&ReportRow::new(&d, reply, user, RouteKind::Image, 0))
                .unwrap();
        }
        assert_eq!(log.count_for(1001).unwrap(), 2);
        assert_eq!(log.count_for(1003).unwrap(), 0);
        let json: serde_json::Value = serde_json::from_str(
            std::fs::read_to_string(log.log().path())
                .unwrap()
                .lines()
                .next()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(json["reply_message_id"], "1001");
        assert_eq!(json["user_id"], "5");
        assert_eq!(json["target"], "image");
        assert_eq!(json["text"], "message 1");
        assert_eq!(json["time"], "1970-01-01T00:00:00.000Z");
    }
}
