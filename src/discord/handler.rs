//! serenity's `EventHandler`: thin glue from gateway events to the
//! [`Responder`](crate::respond::Responder). Every failure to send is
//! logged and never propagated; every event is tracked so that shutdown
//! can wait for it.

use std::sync::Arc;

use serenity::all::{
    ChannelId, Context, CreateAllowedMentions, CreateAttachment, CreateMessage, EditMessage,
    EventHandler, GetMessages, GuildId, Http, Interaction, Member, Message, MessageId, Reaction,
    ReactionType, Ready, UserId,
};
use serenity::async_trait;

use super::reply::{flag_target, render};
use super::{commands, Bot};
use crate::backends::chat::{ChatMessage, ChatRole};
use crate::feedback::{Origin, RouteKind};
use crate::respond::{Answer, FlagResult, Incoming, Verdict};

/// The reaction the bot adds to a reply once a flag is recorded.
pub const ACK_EMOJI: char = '✅';

pub struct Handler {
    bot: Arc<Bot>,
}

impl Handler {
    pub fn new(bot: Arc<Bot>) -> Self {
        Self { bot }
    }
}

#[async_trait]
impl EventHandler for Handler {
    async fn ready(&self, ctx: Context, ready: Ready) {
        let _ = self.bot.me.set(ready.user.id);
        tracing::info!(
            user = %ready.user.name,
            guilds = ready.guilds.len(),
            shard = ?ready.shard.map(|s| s.id.0),
            "connected to Discord"
        );
        commands::register(&ctx, &self.bot).await;
    }

    async fn message(&self, ctx: Context, msg: Message) {
        let Some(_guard) = self.track() else { return };
        on_message(&self.bot, &ctx, &msg).await;
    }

    async fn reaction_add(&self, ctx: Context, reaction: Reaction) {
        let Some(_guard) = self.track() else { return };
        on_flag(&self.bot, &ctx, &reaction).await;
    }

    async fn reaction_remove(&self, ctx: Context, reaction: Reaction) {
        let Some(_guard) = self.track() else { return };
        on_unflag(&self.bot, &ctx, &reaction).await;
    }

    async fn interaction_create(&self, ctx: Context, interaction: Interaction) {
        let Some(_guard) = self.track() else { return };
        if let Interaction::Command(cmd) = interaction {
            commands::handle(&self.bot, &ctx, &cmd).await;
        }
    }
}

impl Handler {
    /// Counts the event as in flight, unless the bot is shutting down.
    fn track(&self) -> Option<tokio_util::task::task_tracker::TaskTrackerToken> {
        self.bot.accepting().then(|| self.bot.in_flight.token())
    }
}

/// The replied user only: model and backend text may contain `@everyone`
/// or role mentions, which must never ping anyone.
pub fn mentions() -> CreateAllowedMentions {
    CreateAllowedMentions::new().replied_user(true)
}

/// Whether the bot should answer this message at all.
fn wanted(bot: &Bot, msg: &Message, me: Option<UserId>) -> Option<bool> {
    if msg.author.bot || Some(msg.author.id) == me || msg.content.trim().is_empty() {
        return None;
    }
    let mentioned = me.is_some_and(|me| msg.mentions.iter().any(|u| u.id == me));
    let addressed = msg.guild_id.is_none() || mentioned;
    let allowed = &bot.settings.allowed_channel_ids;
    let in_channel = allowed.is_empty() || allowed.contains(&msg.channel_id.get());
    (addressed || in_channel).then_some(addressed)
}

async fn on_message(bot: &Bot, ctx: &Context, msg: &Message) {
    let Some(addressed) = wanted(bot, msg, bot.me()) else {
        return;
    };
    let responder = &bot.responder;
    match responder.admit(msg.author.id.get()) {
        Verdict::Allowed => {}
        Verdict::LimitedTell => {
            send_answer(
                &ctx.http,
                msg.channel_id,
                Some(msg.id),
                &Answer::RateLimited,
            )
            .await;
            return;
        }
        Verdict::LimitedQuiet => return,
    }
    let incoming = Incoming {
        user_message_id: msg.id.get(),
        guild_id: msg.guild_id.map(GuildId::get),
        channel_id: msg.channel_id.get(),
        author_id: msg.author.id.get(),
        text: msg.content.clone(),
        addressed,
    };
    let decided = match responder.decide(&incoming, Origin::Router).await {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(message = msg.id.get(), error = %e, "routing failed");
            if addressed {
                let answer = Answer::ChatFailed {
                    reason: "Sorry, I couldn't process that message; please try again.".into(),
                };
                send_answer(&ctx.http, msg.channel_id, Some(msg.id), &answer).await;
            }
            return;
        }
    };
    // Typing lasts while the picture is being made (serenity renews it).
    let typing = decided
        .is_image()
        .then(|| msg.channel_id.start_typing(&ctx.http));
    let context = history(bot, &ctx.http, msg.channel_id, msg.id);
    let answer = responder.answer(&decided, addressed, context).await;
    drop(typing);
    if let Some(reply) = send_answer(&ctx.http, msg.channel_id, Some(msg.id), &answer).await {
        responder.replied(msg.id.get(), reply.get()).await;
    }
}

/// The picture of an image answer, as an upload.
pub fn attachment(answer: &Answer) -> Option<CreateAttachment> {
    match answer {
        Answer::Image { image, .. } => Some(CreateAttachment::bytes(
            image.bytes.clone(),
            image.file_name(),
        )),
        _ => None,
    }
}

/// Sends an answer: the first piece replies to `reply_to` (with the picture
/// when there is one), the rest follow. Returns the first message's id.
pub async fn send_answer(
    http: &Http,
    channel: ChannelId,
    reply_to: Option<MessageId>,
    answer: &Answer,
) -> Option<MessageId> {
    let rendered = render(answer);
    let mut first = None;
    for (i, piece) in rendered.pieces.iter().enumerate() {
        let mut m = CreateMessage::new()
            .content(piece.as_str())
            .allowed_mentions(mentions());
        if i == 0 {
            if let Some(id) = reply_to {
                m = m.reference_message((channel, id));
            }
            if let Some(file) = attachment(answer) {
                m = m.add_file(file);
            }
        }
        match channel.send_message(http, m).await {
            Ok(sent) => {
                first.get_or_insert(sent.id);
            }
            Err(e) => {
                tracing::warn!(channel = channel.get(), error = %e, "cannot send a reply");
                break;
            }
        }
    }
    first
}

/// Replaces the bot's reply `reply` with a corrected answer, in place; text
/// beyond the first piece follows as new messages.
pub async fn fix_in_place(http: &Http, channel: ChannelId, reply: MessageId, answer: &Answer) {
    let rendered = render(answer);
    let Some(first) = rendered.pieces.first() else {
        return;
    };
    let mut edit = EditMessage::new()
        .content(first.as_str())
        .allowed_mentions(mentions())
        .remove_all_attachments();
    if let Some(file) = attachment(answer) {
        edit = edit.new_attachment(file);
    }
    if let Err(e) = channel.edit_message(http, reply, edit).await {
        tracing::warn!(message = reply.get(), error = %e, "cannot fix a reply in place");
        return;
    }
    for piece in &rendered.pieces[1..] {
        let m = CreateMessage::new()
            .content(piece.as_str())
            .allowed_mentions(mentions());
        if let Err(e) = channel.send_message(http, m).await {
            tracing::warn!(error = %e, "cannot send the rest of a fixed reply");
            break;
        }
    }
}

/// The channel's messages before `before`, oldest first, as chat context.
async fn history(
    bot: &Bot,
    http: &Http,
    channel: ChannelId,
    before: MessageId,
) -> Vec<ChatMessage> {
    let limit = bot.settings.chat_context_messages;
    if limit == 0 {
        return Vec::new();
    }
    let me = bot.me();
    let messages = match channel
        .messages(http, GetMessages::new().before(before).limit(limit))
        .await
    {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read channel history; answering without it");
            return Vec::new();
        }
    };
    messages
        .into_iter()
        .rev()
        .filter(|m| !m.content.trim().is_empty())
        .map(|m| {
            if Some(m.author.id) == me {
                ChatMessage {
                    role: ChatRole::Assistant,
                    content: m.content,
                }
            } else {
                ChatMessage {
                    role: ChatRole::User,
                    content: format!("{}: {}", m.author.name, m.content),
                }
            }
        })
        .collect()
}

/// Whether `member` moderates `channel`: one of the moderator roles, or
/// Manage Messages there (from the cached guild: roles and overwrites).
pub fn is_moderator(
    bot: &Bot,
    ctx: &Context,
    guild: Option<GuildId>,
    channel: ChannelId,
    member: Option<&Member>,
) -> bool {
    let (Some(guild), Some(member)) = (guild, member) else {
        return false;
    };
    let roles = &bot.settings.moderator_role_ids;
    if member.roles.iter().any(|r| roles.contains(&r.get())) {
        return true;
    }
    let Some(g) = ctx.cache.guild(guild) else {
        return false;
    };
    let perms = match g.channels.get(&channel) {
        Some(ch) => g.user_permissions_in(ch, member),
        // A thread or an uncached channel: the member's guild permissions.
        None => g.member_permissions(member),
    };
    perms.manage_messages()
}

fn reaction_name(r: &Reaction) -> Option<String> {
    match &r.emoji {
        ReactionType::Unicode(s) => Some(s.clone()),
        ReactionType::Custom { name, .. } => name.clone(),
        _ => None,
    }
}

/// The user and the correction a reaction stands for, if it is a flag
/// emoji from someone other than the bot (its own reactions never count).
fn flag_of(bot: &Bot, r: &Reaction) -> Option<(UserId, RouteKind)> {
    let user = r.user_id.filter(|&u| Some(u) != bot.me())?;
    let emoji = reaction_name(r)?;
    let target = flag_target(
        &emoji,
        &bot.settings.flag_image_emoji,
        &bot.settings.flag_chat_emoji,
    )?;
    Some((user, target))
}

async fn on_flag(bot: &Bot, ctx: &Context, r: &Reaction) {
    let me = bot.me();
    let Some((user, target)) = flag_of(bot, r) else {
        return;
    };
    if r.message_author_id.is_some() && r.message_author_id != me {
        return; // not the bot's message
    }
    let moderator = is_moderator(bot, ctx, r.guild_id, r.channel_id, r.member.as_ref());
    apply_flag(
        bot,
        ctx,
        r.channel_id,
        r.message_id,
        user,
        target,
        moderator,
    )
    .await;
}

/// A flag from a reaction or a message command: record it, then acknowledge
/// it and fix the answer in place. Returns what happened.
pub async fn apply_flag(
    bot: &Bot,
    ctx: &Context,
    channel: ChannelId,
    reply: MessageId,
    user: UserId,
    target: RouteKind,
    moderator: bool,
) -> FlagResult {
    let responder = &bot.responder;
    // Chat context is what preceded the original user message.
    let before = match responder.record.by_reply(reply.get()) {
        Ok(Some(d)) => MessageId::new(d.user_message_id.max(1)),
        _ => reply,
    };
    let context = history(bot, &ctx.http, channel, before);
    let result = responder
        .flag(reply.get(), user.get(), target, moderator, context)
        .await;
    match &result {
        FlagResult::Recorded { fix, .. } => {
            if let Err(e) = channel.create_reaction(&ctx.http, reply, ACK_EMOJI).await {
                tracing::warn!(error = %e, "cannot acknowledge a flag");
            }
            fix_in_place(&ctx.http, channel, reply, fix).await;
        }
        FlagResult::Reported => {
            tracing::info!(
                reply = reply.get(),
                user = user.get(),
                "flag from a non-moderator counted in the reports file"
            );
        }
        FlagResult::Ignored(why) => {
            tracing::debug!(reply = reply.get(), why, "flag ignored");
        }
    }
    result
}

async fn on_unflag(bot: &Bot, ctx: &Context, r: &Reaction) {
    let Some((user, target)) = flag_of(bot, r) else {
        return;
    };
    if bot
        .responder
        .unflag(r.message_id.get(), user.get(), target)
        .await
    {
        let ack = ReactionType::Unicode(ACK_EMOJI.to_string());
        if let Err(e) = ctx
            .http
            .delete_reaction_me(r.channel_id, r.message_id, &ack)
            .await
        {
            tracing::warn!(error = %e, "cannot remove the acknowledgement");
        }
    }
}
