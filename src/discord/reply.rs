//! Pure text work for Discord replies: what each answer says, messages cut
//! to Discord's 2000-character limit on line or sentence boundaries, and
//! emoji compared without their variation selectors. No I/O: unit-tested.

use crate::feedback::RouteKind;
use crate::respond::Answer;

/// Discord's limit on a message's length, in characters.
pub const MESSAGE_LIMIT: usize = 2000;

/// What to send for an answer: text pieces, the first one replying to the
/// user (and carrying the picture of an image answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub pieces: Vec<String>,
}

/// The text of an answer.
pub fn render(answer: &Answer) -> Rendered {
    let one = |s: String| Rendered {
        pieces: split_message(&s, MESSAGE_LIMIT),
    };
    match answer {
        Answer::Image { prompt, .. } => Rendered {
            pieces: vec![image_caption(prompt)],
        },
        Answer::ImageFailed { prompt, reason } => {
            one(format!("{reason}\n> {}", quote_prompt(prompt)))
        }
        Answer::ImageUnconfigured { prompt } => one(format!(
            "🎨 I would draw: {}\n(No image generator is set up here yet; the server owner can configure one.)",
            quote_prompt(prompt)
        )),
        Answer::Chat { text } => one(text.clone()),
        Answer::ChatFailed { reason } => one(reason.clone()),
        Answer::ChatUnconfigured => one(
            "I draw pictures: tell me what to draw. Chat is not configured here.".to_string(),
        ),
        Answer::RateLimited => one(
            "You're sending messages faster than I can keep up; please wait a minute. 🙏"
                .to_string(),
        ),
        Answer::Silent => Rendered { pieces: Vec::new() },
    }
}

/// The text sent with a picture: the prompt it was drawn from.
fn image_caption(prompt: &str) -> String {
    format!("🎨 {}", quote_prompt(prompt))
}

/// A prompt shown in a message: one line, within the message limit.
fn quote_prompt(prompt: &str) -> String {
    let one_line = prompt.split_whitespace().collect::<Vec<_>>().join(" ");
    crate::respond::cut_chars(&one_line, MESSAGE_LIMIT - 200).to_string()
}

/// Splits `text` into pieces of at most `limit` characters, preferring line
/// breaks, then sentence ends, then spaces; a run without any is cut
/// between characters (never inside one).
pub fn split_message(text: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut pieces = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if rest.chars().count() <= limit {
            pieces.push(rest.to_string());
            break;
        }
        // Byte offset just past the `limit`-th character.
        let hard = rest
            .char_indices()
            .nth(limit)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        let window = &rest[..hard];
        let cut = last_break(window, &['\n'])
            .or_else(|| last_break(window, &['。', '！', '？', '!', '?', '.', '；', ';']))
            .or_else(|| last_break(window, &[' ', '，', ',']))
            .unwrap_or(hard);
        let (head, tail) = rest.split_at(cut);
        let head = head.trim_end();
        if !head.is_empty() {
            pieces.push(head.to_string());
        }
        rest = tail.trim_start();
    }
    pieces
}

/// Byte offset just after the last of `chars` in `window`, if it is not at
/// the very start (a piece must make progress).
fn last_break(window: &str, chars: &[char]) -> Option<usize> {
    window
        .char_indices()
        .rev()
        .filter(|(_, c)| chars.contains(c))
        .map(|(i, c)| i + c.len_utf8())
        .find(|&end| end > 1)
}

/// An emoji name without variation selectors (U+FE0F, U+FE0E): Discord
/// sends 🖼️ with or without them.
pub fn normalise_emoji(name: &str) -> String {
    name.chars()
        .filter(|&c| c != '\u{FE0F}' && c != '\u{FE0E}')
        .collect()
}

/// Which correction a reaction asks for, if it is one of the flag emoji.
pub fn flag_target(emoji: &str, image_flag: &str, chat_flag: &str) -> Option<RouteKind> {
    let e = normalise_emoji(emoji);
    if e == normalise_emoji(image_flag) {
        Some(RouteKind::Image)
    } else if e == normalise_emoji(chat_flag) {
        Some(RouteKind::Chat)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_piece_and_long_text_splits_on_lines_then_sentences() {
        assert_eq!(split_message("hello", 2000), vec!["hello"]);
        assert!(split_message("   ", 2000).is_empty());
        let text = format!("{}\n{}", "a".repeat(1500), "b".repeat(1500));
        let p = split_message(&text, 2000);
        assert_eq!(p, vec!["a".repeat(1500), "b".repeat(1500)]);
        let cjk = "這是一句話。".repeat(500); // 3000 characters, 9000 bytes
        let p = split_message(&cjk, 2000);
        assert!(p
            .iter()
            .all(|s| s.chars().count() <= 2000 && s.ends_with('。')));
        assert_eq!(p.concat(), cjk);
    }

    #[test]
    fn text_without_breaks_is_cut_between_characters() {
        let emoji = "🐱".repeat(4500);
        let p = split_message(&emoji, 2000);
        assert_eq!(
            p.iter().map(|s| s.chars().count()).collect::<Vec<_>>(),
            vec![2000, 2000, 500]
        );
    }

    #[test]
    fn flag_emoji_match_with_or_without_variation_selector() {
        assert_eq!(flag_target("🖼", "🖼️", "💬"), Some(RouteKind::Image));
        assert_eq!(flag_target("🖼️", "🖼", "💬"), Some(RouteKind::Image));
        assert_eq!(flag_target("💬", "🖼️", "💬"), Some(RouteKind::Chat));
        assert_eq!(flag_target("👍", "🖼️", "💬"), None);
    }

    #[test]
    fn every_answer_fits_discord_and_silence_sends_nothing() {
        assert!(render(&Answer::Silent).pieces.is_empty());
        let long = Answer::Chat {
            text: "word ".repeat(1000),
        };
        let r = render(&long);
        assert!(r.pieces.len() == 3 && r.pieces.iter().all(|p| p.chars().count() <= 2000));
        let r = render(&Answer::ImageUnconfigured {
            prompt: "a cat\nin space".into(),
        });
        assert!(r.pieces[0].contains("a cat in space"), "{r:?}");
        assert_eq!(render(&Answer::ChatUnconfigured).pieces.len(), 1);
    }
}
