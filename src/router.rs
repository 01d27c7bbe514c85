//! Routing decisions: for each message, an image call or chat.
//!
//! [`Router`] owns a model and decides batches of messages at once. It stops
//! generating as soon as the route is known: a reply that can no longer
//! become a call is chat (the chat backend writes the real answer), a call
//! stops at its closing `)`. Once a reply starts like a call, the rest of
//! the fixed opening `call("generate_image", {"prompt": "` is fed in one
//! step instead of one token per step. The system prompt's keys/values are
//! computed once per adapter and shared by every batch.
//!
//! The first generated position also yields the probability of the call
//! opening: with a `call_threshold` the route is decided by that probability
//! instead of by the arg-max, trading recall for precision on purpose.
//! [`Router::extract_prompts`] forces the call opening and lets the model
//! write only the prompt (a moderator said "this should have been a picture").
//!
//! On CUDA a batch of up to 32 messages is decided with replayed steps
//! ([`RouterConfig::cuda_graphs`]): its keys and values go into a static
//! cache kept per batch size, which also keeps the system prefix from one
//! batch to the next, and each step shape is captured once as a CUDA graph
//! ([`GraphStep`]) and then launched whole. Everything else (the CPU, larger
//! batches, long messages) steps eagerly over a growing [`Cache`].
//!
//! The engine thread that serves async callers lives in [`crate::engine`].

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::Tensor;
use serde::Serialize;

use crate::lora::Adapter;
use crate::model::{dense_batch, BaseModel, Batch, Cache, Decoder, GraphStep, Mode, StaticCache};
use crate::prompt::{parse_reply, progress, Progress, Reply};
use crate::{Error, Result};

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Image,
    Chat,
}

/// The router's answer for one message.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub route: Route,
    /// The image prompt, for image routes.
    pub prompt: Option<String>,
    /// What the model generated (cut short once the route was known).
    pub output: String,
    /// Tokens generated (forced call-opening tokens included).
    pub new_tokens: usize,
    /// Probability of the call opening at the first generated position.
    pub call_probability: f32,
}

/// Decisions are equal when they route and write the same; their call
/// probabilities need only agree to 1e-4, since batching changes the order
/// of float sums.
impl PartialEq for Decision {
    fn eq(&self, other: &Self) -> bool {
        self.route == other.route
            && self.prompt == other.prompt
            && self.output == other.output
            && self.new_tokens == other.new_tokens
            && (self.call_probability - other.call_probability).abs() <= 1e-4
    }
}

/// Knobs of the decision procedure.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Upper bound on generated tokens per message.
    pub max_new_tokens: usize,
    /// Stop as soon as a reply cannot become a call (a chat backend answers).
    pub stop_at_chat: bool,
    /// Feed the fixed call opening in one step once a reply starts like a call.
    pub force_call_prefix: bool,
    /// Messages decided in one forward batch at most.
    pub max_batch: usize,
    /// User text is cut to this many tokens (Discord messages are short).
    pub max_input_tokens: usize,
    /// Decide the route by the call opening's probability at the first
    /// position (call when `>=` this) instead of by the arg-max token.
    pub call_threshold: Option<f32>,
    /// Prompt-lookup drafts: up to this many tokens copied from the message
    /// after the latest match of the reply's last tokens, checked in one
    /// step (0: one token per step). Greedy checking keeps the output
    /// what one token per step writes; image prompts mostly copy the user's
    /// words, so most drafts are accepted. `None`: 6. On the GPU a step of
    /// 7 tokens costs what one does; on the CPU the head's Q8_0 copy reads
    /// its weights once for all the rows of a step (`model::q8`), so drafts
    /// pay there too (dev CPU, per image call: 481 ms with 6 against
    /// 581-731 ms without).
    pub draft_tokens: Option<usize>,
    /// Messages longer than twice this many tokens are read this many
    /// tokens at a time ([`Router::begin_long`]), so that the engine can
    /// decide the short messages that arrive meanwhile between two chunks.
    pub prefill_chunk: usize,
    /// Decide batches of up to 32 messages with steps replayed from CUDA
    /// graphs over a preallocated cache ([`GraphStep`]). `None`: on CUDA
    /// only. `Some(true)` on the CPU runs the same steps eagerly (what the
    /// tests compare with the growing cache); `Some(false)` never.
    pub cuda_graphs: Option<bool>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 96,
            stop_at_chat: true,
            force_call_prefix: true,
            max_batch: 16,
            max_input_tokens: 1024,
            call_threshold: None,
            draft_tokens: None,
            prefill_chunk: 128,
            cuda_graphs: None,
        }
    }
}

/// A model plus everything needed to route with it.
pub struct Router {
    base: BaseModel,
    pub config: RouterConfig,
    adapter: Option<PathBuf>,
    /// The adapter's recorded call threshold (its `router.json`), used when
    /// `config.call_threshold` is not set.
    adapter_threshold: Option<f32>,
    /// Prompt prefix ids and their cached keys/values (batch of one).
    /// Cleared whenever the adapter changes: LoRA on k/v changes them.
    prefix: Option<(Vec<u32>, Cache)>,
    call_prefix_ids: Vec<u32>,
    /// Bumped whenever the weights may change (adapter swaps, `base_mut`),
    /// so that a [`LongPrefill`] begun before cannot be finished after.
    generation: u64,
    /// Static caches and captured steps, for the weights of one generation
    /// (a captured graph reads the weights at their addresses).
    replays: Replays,
}

/// Batches of up to this many messages are decided with replayed steps
/// (only as many as `max_batch` allows: the bot's default of 16 never
/// captures the 32-row steps). Eager steps of more messages are bound by
/// the host's launches: 32 messages took 6.5 ms eagerly on an H200.
const REPLAY_MAX_ROWS: usize = 32;
/// Messages of up to this many tokens are read by a replayed first step;
/// first steps are padded to a multiple of [`REPLAY_FIRST_STEP`] columns.
const REPLAY_MAX_FIRST: usize = 128;
const REPLAY_FIRST_STEP: usize = 16;
/// Columns a replayed batch may append after its first step; a batch that
/// needs more goes on with a growing cache.
const REPLAY_GENERATED_COLUMNS: usize = 256;

/// The replayed steps of the router's current weights.
#[derive(Default)]
struct Replays {
    generation: u64,
    /// By (rows, capacity).
    by_shape: HashMap<(usize, usize), Replay>,
}

/// A static cache for batches of `rows` messages (a power of two: shorter
/// batches are padded with empty rows) and its captured steps, by (width,
/// scored columns). The system prefix stays in the cache's first columns
/// from one batch to the next.
struct Replay {
    cache: StaticCache,
    prefix_len: Option<usize>,
    steps: HashMap<(usize, usize), GraphStep>,
}

impl Replay {
    /// Runs the step of `width` columns scoring `room` of them (see
    /// [`GraphStep::run`]); the step is made, and on CUDA captured, the
    /// first time its shape is asked for. The caller records the step in
    /// the cache (`advance`) when it is part of a batch.
    fn run(
        &mut self,
        dec: &Decoder,
        width: usize,
        room: usize,
        tokens: &[u32],
        batch: &Batch,
        scored: &[u32],
    ) -> Result<Tensor> {
        let (rows, capacity) = (self.cache.rows(), self.cache.capacity());
        let step = match self.steps.entry((width, room)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(GraphStep::new(dec, rows, width, capacity, room)?)
            }
        };
        Ok(step.run(dec, &self.cache, tokens, batch, scored)?)
    }

    /// Starts a batch after the system prefix: kept in place when it is
    /// already there, else loaded.
    fn start(&mut self, prefix_len: usize, prefix: &Cache) -> Result<()> {
        if self.prefix_len == Some(prefix_len) {
            self.cache.truncate(prefix_len);
        } else {
            self.cache.reset();
            self.cache.load(&prefix.repeat(self.cache.rows())?)?;
            self.prefix_len = Some(prefix_len);
        }
        Ok(())
    }
}

/// Columns a replayed step of `rows` x `width` scores: a first step each
/// row's last column; a later one each row's last real token and its
/// drafts, never more than `drafts + 1` per row whatever the width (the
/// forced call opening widens a step without being scored), so the logits
/// buffer and the head's work stay small.
fn scored_room(rows: usize, width: usize, first: bool, drafts: usize) -> usize {
    rows * if first { 1 } else { width.min(drafts + 1) }
}

/// Where a batch's keys and values live while it is decided.
enum Kv {
    /// One row per active message: rows leave when their message is decided.
    Growing(Cache),
    /// Row `i` is message `i` for the whole batch: decided messages and the
    /// rows past the last message are padding.
    Replay { key: (usize, usize), replay: Replay },
}

/// What the trainer records next to an adapter for the router
/// (`router.json`): the call threshold chosen on the validation split.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterMeta {
    pub call_threshold: Option<f32>,
}

impl AdapterMeta {
    pub const FILE: &'static str = "router.json";

    /// The adapter's metadata; none recorded is the default.
    pub fn load(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| Error::Json {
                path,
                line: None,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        let path = dir.join(Self::FILE);
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json {
            path: path.clone(),
            line: None,
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| Error::io(path, e))
    }
}

/// Receives each length group (indices into the messages) and its decisions.
type GroupSink<'a> = dyn FnMut(&[usize], Result<Vec<Decision>>) + 'a;

/// How the first token of a reply is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    /// By the model (arg-max, or the call threshold when one is set).
    Free,
    /// The call opening is forced: only the prompt is generated.
    Call,
}

/// Per-message generation state.
struct Row {
    /// The message's input ids (drafts are copied from them).
    input: Vec<u32>,
    generated: Vec<u32>,
    /// Finished: a stop token, a decided route, or the token budget.
    done: bool,
    /// Tokens to append at the next step: the last generated token, then
    /// any draft tokens.
    next: Vec<u32>,
    /// How many of `next` are draft tokens still to be checked.
    drafted: usize,
    next_position: u32,
}

/// A long message being read in chunks: its ids and the keys/values read
/// so far ([`Router::begin_long`], [`Router::advance`],
/// [`Router::finish_long`]). Other messages may be routed between two
/// chunks, but not an adapter swap: the cache belongs to the adapter that
/// began it.
pub struct LongPrefill {
    /// The router's generation (weights version) it was begun under.
    generation: u64,
    ids: Vec<u32>,
    /// Ids already in `cache`.
    read: usize,
    prefix_len: usize,
    cache: Cache,
}

impl LongPrefill {
    /// The message's input tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Up to `max` tokens that followed the latest earlier occurrence of the
/// reply's last 1-3 tokens in `input` (longest match first).
fn lookup_draft(input: &[u32], generated: &[u32], max: usize) -> Vec<u32> {
    if max == 0 {
        return Vec::new();
    }
    for n in (1..=3.min(generated.len())).rev() {
        let tail = &generated[generated.len() - n..];
        let found = input
            .windows(n)
            .enumerate()
            .rev()
            .find(|(at, w)| *w == tail && at + n < input.len());
        if let Some((at, _)) = found {
            let from = at + n;
            return input[from..(from + max).min(input.len())].to_vec();
        }
    }
    Vec::new()
}

impl Router {
    pub fn new(base: BaseModel, config: RouterConfig) -> Result<Self> {
        let call_prefix_ids = base.format.call_prefix_ids()?;
        if call_prefix_ids.is_empty() {
            return Err(Error::Tokenizer(
                "the call opening tokenizes to nothing".into(),
            ));
        }
        Ok(Self {
            base,
            config,
            adapter: None,
            adapter_threshold: None,
            prefix: None,
            generation: 0,
            call_prefix_ids,
            replays: Replays::default(),
        })
    }

    pub fn base(&self) -> &BaseModel {
        &self.base
    }

    /// Mutable access for callers that change weights (the trainer);
    /// invalidates the prefix cache.
    pub fn base_mut(&mut self) -> &mut BaseModel {
        self.prefix = None;
        self.generation += 1;
        &mut self.base
    }

    /// The call threshold in force: the configured one, else the adapter's.
    pub fn call_threshold(&self) -> Option<f32> {
        self.config.call_threshold.or(self.adapter_threshold)
    }

    /// The adapter in use, if any.
    pub fn adapter(&self) -> Option<&PathBuf> {
        self.adapter.as_ref()
    }

    /// Switches to `adapter` (merged into the weights), or back to the bare
    /// base model with `None`. On error the previous state is kept.
    pub fn set_adapter(&mut self, adapter: Option<&Adapter>) -> Result<()> {
        match adapter {
            Some(a) => {
                let meta = AdapterMeta::load(&a.path)?;
                a.apply(&mut self.base.decoder, true)?;
                self.adapter = Some(a.path.clone());
                self.adapter_threshold = meta.call_threshold;
            }
            None => {
                self.base.decoder.clear_adapter()?;
                self.adapter = None;
                self.adapter_threshold = None;
            }
        }
        self.prefix = None;
        self.generation += 1;
        Ok(())
    }

    /// The prompt prefix's length and its cached keys/values (computed once
    /// per adapter).
    fn prefix_cache(&mut self) -> Result<(usize, Cache)> {
        if let Some((ids, cache)) = &self.prefix {
            return Ok((ids.len(), cache.clone()));
        }
        let ids = self.base.format.prefix_ids()?;
        let dec = &self.base.decoder;
        let tokens = Tensor::new(ids.as_slice(), &dec.device)?.unsqueeze(0)?;
        let batch = dense_batch(1, 0, ids.len());
        let mut cache = Cache::default();
        dec.forward_hidden(&tokens, &batch, Some(&mut cache), Mode::Infer)?;
        let out = (ids.len(), cache.clone());
        self.prefix = Some((ids, cache));
        Ok(out)
    }

    /// Routes one message.
    pub fn route(&mut self, text: &str) -> Result<Decision> {
        let mut out = self.route_batch(&[text])?;
        out.pop().ok_or(Error::EngineStopped)
    }

    /// Routes several messages, `config.max_batch` per forward batch.
    pub fn route_batch(&mut self, texts: &[&str]) -> Result<Vec<Decision>> {
        self.decide_batch(texts, Opening::Free)
    }

    /// The image prompt the model writes for each message once the call
    /// opening is forced: what the user asked to see, in their words.
    /// An empty prompt (the model closed the call at once) is `None`.
    pub fn extract_prompts(&mut self, texts: &[&str]) -> Result<Vec<Option<String>>> {
        Ok(self
            .decide_batch(texts, Opening::Call)?
            .into_iter()
            .map(|d| d.prompt)
            .collect())
    }

    /// Routes several messages and hands each length group's decisions (or
    /// its error) to `each` as soon as the group is decided, shortest group
    /// first (see [`Router::length_groups`]). Fails only when a message
    /// cannot be tokenized.
    pub fn route_groups(
        &mut self,
        texts: &[&str],
        mut each: impl FnMut(&[usize], Result<Vec<Decision>>),
    ) -> Result<()> {
        self.decide_groups(texts, Opening::Free, &mut each)
    }

    fn decide_groups(
        &mut self,
        texts: &[&str],
        opening: Opening,
        each: &mut GroupSink<'_>,
    ) -> Result<()> {
        let ids = texts
            .iter()
            .map(|t| self.input_ids(t))
            .collect::<Result<Vec<_>>>()?;
        for group in self.groups_by_length(&ids) {
            let chunk: Vec<Vec<u32>> = group.iter().map(|&i| ids[i].clone()).collect();
            let decided = self.route_chunk(chunk, opening);
            each(&group, decided);
        }
        Ok(())
    }

    fn decide_batch(&mut self, texts: &[&str], opening: Opening) -> Result<Vec<Decision>> {
        let mut out: Vec<Option<Decision>> = vec![None; texts.len()];
        let mut failed = None;
        self.decide_groups(texts, opening, &mut |group, decided| match decided {
            Ok(ds) => {
                for (&i, d) in group.iter().zip(ds) {
                    out[i] = Some(d);
                }
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
        out.into_iter()
            .map(|d| d.ok_or(Error::Engine("a message was left undecided".into())))
            .collect()
    }

    /// Draft tokens per step ([`RouterConfig::draft_tokens`]).
    pub fn draft_tokens(&self) -> usize {
        self.config.draft_tokens.unwrap_or(6)
    }

    /// Whether a message of `input_tokens` ids (see [`Router::input_ids`])
    /// is long enough to be read in chunks.
    pub fn is_long(&self, input_tokens: usize) -> bool {
        input_tokens > 2 * self.config.prefill_chunk.max(1)
    }

    /// Starts reading a message in chunks; nothing is computed yet.
    pub fn begin_long(&mut self, text: &str) -> Result<LongPrefill> {
        let ids = self.input_ids(text)?;
        let (prefix_len, cache) = self.prefix_cache()?;
        Ok(LongPrefill {
            generation: self.generation,
            ids,
            read: 0,
            prefix_len,
            cache,
        })
    }

    /// Reads the next `config.prefill_chunk` tokens of `long`, keeping its
    /// last chunk for [`Router::finish_long`]. Returns whether only that
    /// last chunk is left.
    pub fn advance(&mut self, long: &mut LongPrefill) -> Result<bool> {
        self.check_generation(long)?;
        let chunk = self.config.prefill_chunk.max(1);
        if long.ids.len() - long.read <= chunk {
            return Ok(true);
        }
        let dec = &self.base.decoder;
        let part =
            Tensor::new(&long.ids[long.read..long.read + chunk], &dec.device)?.unsqueeze(0)?;
        let start = (long.prefix_len + long.read) as u32;
        let batch = dense_batch(1, start, chunk);
        dec.forward_hidden(&part, &batch, Some(&mut long.cache), Mode::Infer)?;
        long.read += chunk;
        Ok(long.ids.len() - long.read <= chunk)
    }

    /// Reads what is left of `long` and decides it, exactly as
    /// [`Router::route`] would (up to the arithmetic of other shapes).
    pub fn finish_long(&mut self, long: LongPrefill) -> Result<Decision> {
        self.check_generation(&long)?;
        let row = Row {
            next: long.ids[long.read..].to_vec(),
            next_position: (long.prefix_len + long.read) as u32,
            input: long.ids,
            generated: Vec::new(),
            done: false,
            drafted: 0,
        };
        let mut decided = self.decide_rows(vec![row], Kv::Growing(long.cache), Opening::Free)?;
        decided
            .pop()
            .ok_or(Error::Engine("a message was left undecided".into()))
    }

    fn check_generation(&self, long: &LongPrefill) -> Result<()> {
        if long.generation != self.generation {
            return Err(Error::Engine(
                "the adapter changed while a long message was being read; route it again".into(),
            ));
        }
        Ok(())
    }

    /// A message's token ids as the router feeds them after the system
    /// prefix: cut to `max_input_tokens`, keeping the start of the message
    /// and the template's turn switch.
    pub fn input_ids(&self, text: &str) -> Result<Vec<u32>> {
        let format = &self.base.format;
        let mut ids = format.user_ids(text)?;
        if ids.len() > self.config.max_input_tokens {
            let tail = format.user_ids("")?;
            let keep = self.config.max_input_tokens.saturating_sub(tail.len());
            ids.truncate(keep);
            ids.extend(tail);
        }
        Ok(ids)
    }

    /// Splits messages into the batches they are decided in: ordered by
    /// input length, at most `max_batch` each, and a new batch wherever a
    /// message is more than twice as long as the batch's shortest (plus a
    /// little slack), so that short messages are never padded to a long
    /// one's length. Indices into `texts`, shortest batch first.
    pub fn length_groups(&self, texts: &[&str]) -> Result<Vec<Vec<usize>>> {
        let ids = texts
            .iter()
            .map(|t| self.input_ids(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.groups_by_length(&ids))
    }

    fn groups_by_length(&self, ids: &[Vec<u32>]) -> Vec<Vec<usize>> {
        const SLACK: usize = 32;
        let mut lengths: Vec<(usize, usize)> =
            ids.iter().enumerate().map(|(i, t)| (t.len(), i)).collect();
        lengths.sort_unstable();
        let max = self.config.max_batch.max(1);
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut shortest = 0;
        for (n, i) in lengths {
            match groups.last_mut() {
                Some(g) if g.len() < max && n <= 2 * shortest + SLACK => g.push(i),
                _ => {
                    shortest = n;
                    groups.push(vec![i]);
                }
            }
        }
        groups
    }

    /// The first token of each active row: the arg-max, unless the call
    /// threshold or a forced opening overrides it. Also returns the call
    /// opening's probability per row.
    fn first_tokens(&self, logits: &Tensor, opening: Opening) -> Result<(Vec<u32>, Vec<f32>)> {
        let call = self.call_prefix_ids[0];
        let (mut tokens, p_call) = self.base.decoder.pick(logits, Some(call))?;
        let p_call = p_call.unwrap_or_default();
        for (k, tok) in tokens.iter_mut().enumerate() {
            let want_call = match (opening, self.call_threshold()) {
                (Opening::Call, _) => true,
                (Opening::Free, Some(t)) => p_call[k] >= t,
                (Opening::Free, None) => continue,
            };
            if want_call {
                *tok = call;
            } else if *tok == call {
                // Below the threshold: the best token that does not open a call.
                let row = logits
                    .get(k)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?;
                *tok = row
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i as u32 != call)
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .map(|(i, _)| i as u32)
                    .unwrap_or(call);
            }
        }
        Ok((tokens, p_call))
    }

    /// Decides one batch, given each message's input ids.
    fn route_chunk(&mut self, inputs: Vec<Vec<u32>>, opening: Opening) -> Result<Vec<Decision>> {
        let (prefix_len, prefix) = self.prefix_cache()?;
        let longest = inputs.iter().map(Vec::len).max().unwrap_or(0);
        let kv = match self.take_replay(inputs.len(), longest, prefix_len)? {
            Some((key, mut replay)) => {
                replay.start(prefix_len, &prefix)?;
                Kv::Replay { key, replay }
            }
            None => Kv::Growing(prefix.repeat(inputs.len())?),
        };
        let rows: Vec<Row> = inputs
            .into_iter()
            .map(|ids| Row {
                next: ids.clone(),
                input: ids,
                generated: Vec::new(),
                done: false,
                drafted: 0,
                next_position: prefix_len as u32,
            })
            .collect();
        self.decide_rows(rows, kv, opening)
    }

    /// Prepares what the first messages would otherwise pay for: the
    /// system prefix's keys and values (on every device; about 1.5 s on
    /// two CPU cores), and where batches are replayed every step shape that
    /// batches of up to `max_batch` messages will need (made, and on CUDA
    /// captured): first steps up to [`REPLAY_MAX_FIRST`] columns and later
    /// ones up to the widest that the forced call opening plus drafts
    /// makes. The steps run on padding only; the static caches keep just
    /// the system prefix. Returns how many step shapes are ready (0 where
    /// batches are not replayed). The weights' next change drops it all.
    pub fn warm_up(&mut self) -> Result<usize> {
        let (prefix_len, prefix) = self.prefix_cache()?;
        if !self.replays_steps() {
            return Ok(0);
        }
        let drafts = self.draft_tokens();
        let widest = (self.call_prefix_ids.len() + drafts + 1).next_power_of_two();
        let mut shapes: Vec<(usize, bool)> = (REPLAY_FIRST_STEP..=REPLAY_MAX_FIRST)
            .step_by(REPLAY_FIRST_STEP)
            .map(|w| (w, true))
            .collect();
        shapes.extend(
            std::iter::successors(Some(1), |w| Some(w * 2))
                .take_while(|&w| w <= widest)
                .map(|w| (w, false)),
        );
        let largest = self.config.max_batch.clamp(1, REPLAY_MAX_ROWS);
        let mut ready = 0;
        for rows in
            std::iter::successors(Some(1usize), |r| Some(r * 2)).take_while(|&r| r < 2 * largest)
        {
            let Some((key, mut replay)) = self.take_replay(rows, 0, prefix_len)? else {
                continue;
            };
            replay.start(prefix_len, &prefix)?;
            let dec = &self.base.decoder;
            for &(width, first) in &shapes {
                let room = scored_room(rows, width, first, drafts);
                let batch = Batch {
                    rows: vec![vec![None; width]; rows],
                };
                let tokens = vec![0u32; rows * width];
                // Not advanced: the columns it wrote stay masked.
                replay.run(dec, width, room, &tokens, &batch, &[0])?;
                ready += 1;
            }
            self.replays.by_shape.insert(key, replay);
        }
        Ok(ready)
    }

    /// Whether batches are decided with replayed steps on this device.
    fn replays_steps(&self) -> bool {
        self.config
            .cuda_graphs
            .unwrap_or_else(|| self.base.decoder.device.is_cuda())
    }

    /// The static cache and steps for a batch of `n` messages of up to
    /// `longest` tokens after a prefix of `prefix_len`, taken out of the
    /// router while the batch is decided (`decide_rows` puts it back);
    /// `None` when the batch is decided with a growing cache.
    fn take_replay(
        &mut self,
        n: usize,
        longest: usize,
        prefix_len: usize,
    ) -> Result<Option<((usize, usize), Replay)>> {
        if !self.replays_steps() || n == 0 || n > REPLAY_MAX_ROWS || longest > REPLAY_MAX_FIRST {
            return Ok(None);
        }
        if self.replays.generation != self.generation {
            // New weights: every captured graph reads the old ones.
            self.replays = Replays {
                generation: self.generation,
                by_shape: HashMap::new(),
            };
        }
        let rows = n.next_power_of_two();
        let capacity =
            (prefix_len + REPLAY_MAX_FIRST + REPLAY_GENERATED_COLUMNS).next_multiple_of(64);
        let key = (rows, capacity);
        let replay = match self.replays.by_shape.remove(&key) {
            Some(replay) => replay,
            None => Replay {
                cache: self.base.decoder.static_cache(rows, capacity)?,
                prefix_len: None,
                steps: HashMap::new(),
            },
        };
        Ok(Some((key, replay)))
    }

    /// Generates until every row is decided: `rows[i].next` are the
    /// message tokens still to read after what `cache` (one row each) holds.
    fn decide_rows(
        &mut self,
        mut rows: Vec<Row>,
        mut kv: Kv,
        opening: Opening,
    ) -> Result<Vec<Decision>> {
        let n = rows.len();
        let drafts = self.draft_tokens();
        let format = &self.base.format;
        let (stops, tokenizer) = (&format.stop_ids, format.tokenizer());
        let mut texts_out = vec![String::new(); n];
        // Rows still generating; finished rows leave the batch (and the
        // cache), so a batch of mostly chat costs little after one step.
        let mut active: Vec<usize> = (0..n).collect();
        let mut first_step = true;
        let mut call_probability = vec![0f32; n];
        while !active.is_empty() {
            // A batch that would outgrow its static cache goes on with a
            // growing copy of its active rows; the static cache (its prefix
            // still in place) and its graphs serve the next batch.
            let outgrown = match &kv {
                Kv::Replay { replay, .. } => {
                    let width = step_width(&rows, &active, first_step, true);
                    replay.cache.len() + width > replay.cache.capacity()
                }
                Kv::Growing(_) => false,
            };
            if outgrown {
                if let Kv::Replay { key, replay } =
                    std::mem::replace(&mut kv, Kv::Growing(Cache::default()))
                {
                    kv = Kv::Growing(replay.cache.to_cache()?.select(&active)?);
                    self.replays.by_shape.insert(key, replay);
                }
            }
            let (logits, spans) = self.step(&mut rows, &active, &mut kv, first_step)?;
            // Per active row: the model's next token after each fed column
            // that is checked (the last column, or the last real token and
            // every draft token).
            let predicted: Vec<Vec<u32>> = if first_step {
                let (tokens, p_call) = self.first_tokens(&logits, opening)?;
                for (k, &i) in active.iter().enumerate() {
                    call_probability[i] = p_call[k];
                }
                tokens.into_iter().map(|t| vec![t]).collect()
            } else {
                let (all, _) = self.base.decoder.pick(&logits, None)?;
                spans.iter().map(|r| all[r.clone()].to_vec()).collect()
            };
            first_step = false;
            for (k, &i) in active.iter().enumerate() {
                let row = &mut rows[i];
                // Greedy check: draft token j stands when the model, fed
                // everything before it, predicts it.
                let draft = &row.next[row.next.len() - row.drafted..];
                let pred = &predicted[k];
                let accepted = draft.iter().zip(pred).take_while(|(d, p)| d == p).count();
                let mut tokens = draft[..accepted].to_vec();
                tokens.push(pred[accepted.min(pred.len() - 1)]);
                // Columns of rejected draft tokens stay in the cache, masked.
                let rejected = row.drafted - accepted;
                if rejected > 0 {
                    match &mut kv {
                        Kv::Growing(cache) => cache.forget_last(k, rejected),
                        Kv::Replay { replay, .. } => replay.cache.forget_last(i, rejected),
                    }
                    row.next_position -= rejected as u32;
                }
                row.next.clear();
                row.drafted = 0;
                let mut pending = Vec::new();
                for tok in tokens {
                    if stops.contains(&tok) {
                        row.done = true;
                        break;
                    }
                    row.generated.push(tok);
                    pending = vec![tok];
                    if self.config.force_call_prefix
                        && row.generated.len() == 1
                        && self.call_prefix_ids.len() > 1
                        && self.call_prefix_ids[0] == tok
                    {
                        let rest = &self.call_prefix_ids[1..];
                        row.generated.extend_from_slice(rest);
                        pending.extend_from_slice(rest);
                    }
                    texts_out[i] = tokenizer.decode(&row.generated)?;
                    let decided = match progress(&texts_out[i]) {
                        Progress::Call(_) => true,
                        Progress::Chat => self.config.stop_at_chat,
                        Progress::Pending => false,
                    };
                    if decided || row.generated.len() >= self.config.max_new_tokens {
                        row.done = true;
                        break;
                    }
                }
                if !row.done {
                    let room = self.config.max_new_tokens - row.generated.len();
                    let draft = lookup_draft(
                        &row.input,
                        &row.generated,
                        drafts.min(room.saturating_sub(1)),
                    );
                    row.drafted = draft.len();
                    row.next = pending;
                    row.next.extend(draft);
                }
            }
            let keep: Vec<usize> = (0..active.len())
                .filter(|&k| !rows[active[k]].done)
                .collect();
            if let Kv::Growing(cache) = &mut kv {
                if keep.len() < active.len() && !keep.is_empty() {
                    *cache = cache.select(&keep)?;
                }
            }
            active = keep.into_iter().map(|k| active[k]).collect();
        }
        if let Kv::Replay { key, replay } = kv {
            self.replays.by_shape.insert(key, replay);
        }
        Ok(rows
            .into_iter()
            .zip(texts_out)
            .zip(call_probability)
            .map(|((row, output), call_probability)| {
                let (route, prompt) = match parse_reply(&output) {
                    Reply::Call { prompt } => (Route::Image, Some(prompt)),
                    Reply::Chat(_) => (Route::Chat, None),
                };
                Decision {
                    route,
                    prompt,
                    output,
                    new_tokens: row.generated.len(),
                    call_probability,
                }
            })
            .collect())
    }

    /// Appends the pending tokens of the `active` rows (ragged: short rows
    /// padded) and returns logits `[N, vocab]` with each active row's range
    /// of them, in `active` order. The first step left-pads so that all
    /// prompts end in the last column and scores only that column; later
    /// steps score the last real token and every draft token after it. A
    /// replayed step covers every row of its cache (the decided and the
    /// missing messages as padding) at a bucketed width.
    fn step(
        &self,
        rows: &mut [Row],
        active: &[usize],
        kv: &mut Kv,
        first: bool,
    ) -> Result<(Tensor, Vec<std::ops::Range<usize>>)> {
        let dec = &self.base.decoder;
        let members: Vec<Option<usize>> = match kv {
            Kv::Growing(_) => active.iter().map(|&i| Some(i)).collect(),
            Kv::Replay { replay, .. } => {
                let mut members = vec![None; replay.cache.rows()];
                for &i in active {
                    members[i] = Some(i);
                }
                members
            }
        };
        let width = step_width(rows, active, first, matches!(kv, Kv::Replay { .. }));
        let mut tokens = Vec::with_capacity(members.len() * width);
        let mut positions = Vec::with_capacity(members.len());
        let mut scored = Vec::with_capacity(active.len());
        let mut spans = Vec::with_capacity(active.len());
        for (k, member) in members.iter().enumerate() {
            let Some(i) = *member else {
                tokens.extend(std::iter::repeat_n(0u32, width));
                positions.push(vec![None; width]);
                continue;
            };
            let row = &mut rows[i];
            let pad = width - row.next.len();
            let mut cols: Vec<Option<u32>> = Vec::with_capacity(width);
            let real: Vec<Option<u32>> = (0..row.next.len() as u32)
                .map(|i| Some(row.next_position + i))
                .collect();
            let start = scored.len();
            if first {
                tokens.extend(std::iter::repeat_n(0u32, pad));
                tokens.extend_from_slice(&row.next);
                cols.extend(std::iter::repeat_n(None, pad));
                cols.extend(real);
                scored.push((k * width + width - 1) as u32);
            } else {
                tokens.extend_from_slice(&row.next);
                tokens.extend(std::iter::repeat_n(0u32, pad));
                cols.extend(real);
                cols.extend(std::iter::repeat_n(None, pad));
                let last_real = row.next.len().max(1) - 1;
                let from = last_real - row.drafted.min(last_real);
                scored.extend((from..=last_real).map(|c| (k * width + c) as u32));
            }
            spans.push(start..scored.len());
            row.next_position += row.next.len() as u32;
            positions.push(cols);
        }
        let batch = Batch { rows: positions };
        let logits = match kv {
            Kv::Growing(cache) => {
                let t = Tensor::from_vec(tokens, (members.len(), width), &dec.device)?;
                let hidden = dec.forward_hidden(&t, &batch, Some(cache), Mode::Infer)?;
                let (b, w, h) = hidden.dims3()?;
                let idx = Tensor::from_vec(scored.clone(), scored.len(), &dec.device)?;
                let picked = hidden.reshape((b * w, h))?.index_select(&idx, 0)?;
                dec.logits(&picked)?
            }
            Kv::Replay { replay, .. } => {
                let room = scored_room(replay.cache.rows(), width, first, self.draft_tokens());
                let logits = replay.run(dec, width, room, &tokens, &batch, &scored)?;
                replay.cache.advance(&batch)?;
                logits
            }
        };
        Ok((logits, spans))
    }
}

/// Columns of the next step: the longest pending run among the active rows.
/// Replayed steps round it up (first steps to a multiple of
/// [`REPLAY_FIRST_STEP`], later ones to a power of two), so that a few
/// captured shapes serve every batch.
fn step_width(rows: &[Row], active: &[usize], first: bool, replayed: bool) -> usize {
    let width = active
        .iter()
        .map(|&i| rows[i].next.len())
        .max()
        .unwrap_or(0)
        .max(1);
    match (replayed, first) {
        (false, _) => width,
        (true, true) => width.next_multiple_of(REPLAY_FIRST_STEP),
        (true, false) => width.next_power_of_two(),
    }
}

#[cfg(test)]
mod tests {
    use super::lookup_draft;

    #[test]
    fn drafts_continue_the_latest_longest_match_in_the_message() {
        let input = [1, 2, 3, 4, 2, 3, 9, 8];
        // "2 3" occurs twice: the latest occurrence is continued.
        assert_eq!(lookup_draft(&input, &[7, 2, 3], 4), vec![9, 8]);
        // Longer matches win over shorter ones.
        assert_eq!(lookup_draft(&input, &[1, 2], 2), vec![3, 4]);
        assert_eq!(lookup_draft(&input, &[5], 4), Vec::<u32>::new());
        assert_eq!(lookup_draft(&input, &[8], 4), Vec::<u32>::new());
        assert_eq!(lookup_draft(&input, &[1], 0), Vec::<u32>::new());
    }
}
