//! THE prompt format and THE call parser: defined once, used by the router,
//! the trainer and the evaluator, so that training and serving never differ.
//!
//! A conversation is rendered as pieces (plain text, or a control token
//! inserted by id) in the model's own chat template, with the router's
//! system instruction folded in. Each text piece is tokenized on its own, so
//! the system prefix always tokenizes the same way and its keys/values can be
//! cached, and user text can never forge a control token.

use serde_json::Value;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The router's instruction: one tool, used only for clear image requests.
pub const SYSTEM_PROMPT: &str = "You are a friendly assistant in a Discord server. \
You have one tool: generate_image({prompt: str}) -> URL, which creates a picture or edits the \
user's picture. Only when the user clearly asks you to draw, generate or edit an image with \
some content, reply with exactly: call(\"generate_image\", {\"prompt\": \"<what to draw, \
concise, in the user's language>\"}). For anything else (questions about images, art advice, \
a request without any content) answer in natural language.";

/// The exact start of every call the model is taught to write.
pub const CALL_PREFIX: &str = "call(\"generate_image\", {\"prompt\": \"";

/// Renders the canonical call for an image prompt (JSON-escaped).
pub fn render_call(prompt: &str) -> String {
    // A `&str` always serializes; the fallback is unreachable.
    let quoted = serde_json::to_string(prompt).unwrap_or_else(|_| "\"\"".into());
    format!("call(\"generate_image\", {{\"prompt\": {quoted}}})")
}

/// What a reply means for the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The whole reply is a valid `generate_image` call.
    Call { prompt: String },
    /// Anything else.
    Chat(String),
}

impl Reply {
    pub fn is_call(&self) -> bool {
        matches!(self, Reply::Call { .. })
    }
}

/// Strict parse: a call only when the WHOLE reply (surrounding whitespace
/// aside) is `call("generate_image", {...})` and the object's `prompt` is a
/// non-empty string. Never panics, whatever the input.
pub fn parse_reply(reply: &str) -> Reply {
    match parse_call(reply.trim()) {
        Some(prompt) => Reply::Call { prompt },
        None => Reply::Chat(reply.to_string()),
    }
}

fn parse_call(s: &str) -> Option<String> {
    let rest = s.strip_prefix("call(")?.trim_start();
    let rest = rest.strip_prefix("\"generate_image\"")?.trim_start();
    let rest = rest.strip_prefix(',')?.trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    let mut stream = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
    let value = stream.next()?.ok()?;
    let tail = rest[stream.byte_offset()..].trim_start();
    if tail != ")" {
        return None;
    }
    let prompt = value.as_object()?.get("prompt")?.as_str()?.trim();
    (!prompt.is_empty()).then(|| prompt.to_string())
}

/// How far a partial reply has got, for stopping generation early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Can no longer become a call: the route is chat.
    Chat,
    /// Still a prefix of some valid call.
    Pending,
    /// A complete, valid call.
    Call(String),
}

/// Classifies a partial reply. `Chat` is only returned once no continuation
/// could make the reply a valid call, so stopping on it never changes the
/// route that the full reply would have had.
pub fn progress(partial: &str) -> Progress {
    if let Reply::Call { prompt } = parse_reply(partial) {
        return Progress::Call(prompt);
    }
    let mut rest = partial.trim_start();
    for lit in ["call(", "\"generate_image\"", ","] {
        if rest.len() < lit.len() {
            return if lit.starts_with(rest) {
                Progress::Pending
            } else {
                Progress::Chat
            };
        }
        match rest.strip_prefix(lit) {
            Some(r) => rest = r.trim_start(),
            None => return Progress::Chat,
        }
    }
    if rest.is_empty() || rest.starts_with('{') {
        Progress::Pending
    } else {
        Progress::Chat
    }
}

/// Which chat template the model was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `<start_of_turn>user ... <end_of_turn>`; the system text opens the user turn.
    Gemma,
    /// Llama-3 header blocks with a real system turn.
    Llama3,
}

/// One piece of a rendered conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    /// A control token, looked up by its string in the vocabulary.
    Control(&'static str),
}

/// A tokenized training example: ids plus which of them are learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// True for assistant tokens (the reply and its end-of-turn).
    pub labels: Vec<bool>,
}

/// The prompt format for one tokenizer: renders and tokenizes conversations.
#[derive(Debug, Clone)]
pub struct PromptFormat {
    pub template: Template,
    tokenizer: Tokenizer,
    /// Tokens generation stops at.
    pub stop_ids: Vec<u32>,
}

impl PromptFormat {
    /// Picks the template from the vocabulary: Gemma turn tokens or Llama-3 headers.
    pub fn new(tokenizer: Tokenizer) -> Result<Self> {
        let (template, stops) = if tokenizer.token_id("<start_of_turn>").is_some() {
            (Template::Gemma, ["<end_of_turn>", "<eos>"])
        } else if tokenizer.token_id("<|start_header_id|>").is_some() {
            (Template::Llama3, ["<|eot_id|>", "<|end_of_text|>"])
        } else {
            return Err(Error::Tokenizer(
                "vocabulary has neither Gemma turn tokens nor Llama-3 header tokens".into(),
            ));
        };
        let mut stop_ids: Vec<u32> = stops.iter().filter_map(|s| tokenizer.token_id(s)).collect();
        stop_ids.extend(tokenizer.eos_id);
        stop_ids.dedup();
        Ok(Self {
            template,
            tokenizer,
            stop_ids,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The shared start of every prompt (template opening + system text).
    pub fn prefix_pieces(&self) -> Vec<Piece> {
        match self.template {
            Template::Gemma => vec![
                Piece::Control("<bos>"),
                Piece::Control("<start_of_turn>"),
                Piece::Text(format!("user\n{SYSTEM_PROMPT}\n\n")),
            ],
            Template::Llama3 => vec![
                Piece::Control("<|begin_of_text|>"),
                Piece::Control("<|start_header_id|>"),
                Piece::Text("system".into()),
                Piece::Control("<|end_header_id|>"),
                Piece::Text(format!("\n\n{SYSTEM_PROMPT}")),
                Piece::Control("<|eot_id|>"),
                Piece::Control("<|start_header_id|>"),
                Piece::Text("user".into()),
                Piece::Control("<|end_header_id|>"),
                Piece::Text("\n\n".into()),
            ],
        }
    }

    /// The user message and the opening of the model's turn.
    pub fn user_pieces(&self, user: &str) -> Vec<Piece> {
        let mut p = vec![Piece::Text(user.to_string())];
        match self.template {
            Template::Gemma => p.extend([
                Piece::Control("<end_of_turn>"),
                Piece::Text("\n".into()),
                Piece::Control("<start_of_turn>"),
                Piece::Text("model\n".into()),
            ]),
            Template::Llama3 => p.extend([
                Piece::Control("<|eot_id|>"),
                Piece::Control("<|start_header_id|>"),
                Piece::Text("assistant".into()),
                Piece::Control("<|end_header_id|>"),
                Piece::Text("\n\n".into()),
            ]),
        }
        p
    }

    /// The assistant's reply and its end-of-turn.
    pub fn reply_pieces(&self, reply: &str) -> Vec<Piece> {
        let end = match self.template {
            Template::Gemma => "<end_of_turn>",
            Template::Llama3 => "<|eot_id|>",
        };
        vec![Piece::Text(reply.to_string()), Piece::Control(end)]
    }

    /// Tokenizes pieces; text pieces are encoded independently.
    pub fn encode_pieces(&self, pieces: &[Piece]) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for p in pieces {
            match p {
                Piece::Text(t) if t.is_empty() => {}
                Piece::Text(t) => ids.extend(self.tokenizer.encode(t)?),
                Piece::Control(c) => ids.push(self.tokenizer.token_id(c).ok_or_else(|| {
                    Error::Tokenizer(format!("vocabulary lacks control token {c}"))
                })?),
            }
        }
        Ok(ids)
    }

    /// Ids of the shared prefix.
    pub fn prefix_ids(&self) -> Result<Vec<u32>> {
        self.encode_pieces(&self.prefix_pieces())
    }

    /// Ids that follow the prefix for a user message, ending where the model
    /// starts its reply.
    pub fn user_ids(&self, user: &str) -> Result<Vec<u32>> {
        self.encode_pieces(&self.user_pieces(user))
    }

    /// A full training example; only the reply tokens are labelled.
    pub fn example(&self, user: &str, reply: &str) -> Result<Example> {
        let mut ids = self.prefix_ids()?;
        ids.extend(self.user_ids(user)?);
        let prompt_len = ids.len();
        ids.extend(self.encode_pieces(&self.reply_pieces(reply))?);
        let labels = (0..ids.len()).map(|i| i >= prompt_len).collect();
        Ok(Example { ids, labels })
    }

    /// Ids of the canonical call opening, as the model sees it inside a reply.
    pub fn call_prefix_ids(&self) -> Result<Vec<u32>> {
        self.tokenizer.encode(CALL_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(p: &str) -> Reply {
        Reply::Call { prompt: p.into() }
    }

    #[test]
    fn valid_calls() {
        assert_eq!(
            parse_reply(r#"call("generate_image", {"prompt": "a cat"})"#),
            call("a cat")
        );
        assert_eq!(
            parse_reply("  call(\"generate_image\",{\"prompt\":\"夜晚的城市\"})\n"),
            call("夜晚的城市")
        );
        assert_eq!(
            parse_reply(r#"call("generate_image", {"prompt": "say \"hi\" 🐱", "size": "16:9"})"#),
            call("say \"hi\" 🐱")
        );
        assert_eq!(
            parse_reply(&render_call("帶\"引號\"的\n貓")),
            call("帶\"引號\"的\n貓")
        );
        assert!(render_call("x").starts_with(CALL_PREFIX));
    }

    #[test]
    fn near_misses_are_chat() {
        for s in [
            r#"call("generate_image(<參數列表>)")"#,
            r#"call("generate_image", {"prompt": ""})"#,
            r#"call("generate_image", {"prompt": "   "})"#,
            r#"call("generate_image", {"prompt": 42})"#,
            r#"call("generate_image", {"text": "a cat"})"#,
            r#"call("generate_image", ["a cat"])"#,
            r#"call('generate_image', {"prompt": "a cat"})"#,
            r#"call("generate_images", {"prompt": "a cat"})"#,
            r#"call("generate_image", {"prompt": "a cat"}"#,
            r#"call("generate_image", {"prompt": "a cat})"#,
            r#"call("generate_image", {"prompt": "a cat"}))"#,
            r#"Sure! call("generate_image", {"prompt": "a cat"})"#,
            r#"call("generate_image", {"prompt": "a cat"}) Here you go"#,
            r#"```call("generate_image", {"prompt": "a cat"})```"#,
            "",
            "call(",
        ] {
            assert!(!parse_reply(s).is_call(), "{s}");
        }
    }

    #[test]
    fn huge_and_hostile_input_never_panics() {
        let deep = format!(
            "call(\"generate_image\", {}{})",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(!parse_reply(&deep).is_call());
        let long = format!(
            "call(\"generate_image\", {{\"prompt\": \"{}\"}})",
            "貓".repeat(200_000)
        );
        assert!(parse_reply(&long).is_call());
        let junk: String = (0..5000u32).filter_map(char::from_u32).collect();
        assert!(!parse_reply(&junk).is_call());
        for cut in 0..CALL_PREFIX.len() {
            let _ = progress(&CALL_PREFIX[..cut]);
        }
    }

    #[test]
    fn progress_decides_chat_only_when_no_call_is_possible() {
        assert_eq!(progress(""), Progress::Pending);
        assert_eq!(progress("ca"), Progress::Pending);
        assert_eq!(progress("call(\"gen"), Progress::Pending);
        assert_eq!(progress(CALL_PREFIX), Progress::Pending);
        assert_eq!(progress("call(\"generate_image\",{"), Progress::Pending);
        assert_eq!(progress("Sure"), Progress::Chat);
        assert_eq!(progress("你好"), Progress::Chat);
        assert_eq!(progress("call(\"generate_image("), Progress::Chat);
        assert_eq!(progress("call(\"generate_image\", [\"x\"]"), Progress::Chat);
        assert_eq!(
            progress(r#"call("generate_image", {"prompt": "a dog"})"#),
            Progress::Call("a dog".into())
        );
    }
}
