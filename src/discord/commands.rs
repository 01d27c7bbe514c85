//! Application commands: `/draw` (anyone: a picture without the router's
//! judgment), `/router-stats` and `/reload-router` (moderators), and the
//! message commands "Route: image" / "Route: chat" (moderators: the same as
//! a flag reaction). Moderator-only commands carry Manage Messages as their
//! default permission, so Discord hides them from everyone else, and the
//! handler checks again.

use serenity::all::{
    Command, CommandInteraction, CommandOptionType, CommandType, Context, CreateCommand,
    CreateCommandOption, CreateInteractionResponse, CreateInteractionResponseMessage,
    EditInteractionResponse, MessageId, Permissions,
};

use super::handler::{apply_flag, attachment, mentions};
use super::reply::render;
use super::Bot;
use crate::adapters::{reload, Reload};
use crate::feedback::RouteKind;
use crate::respond::{Answer, FlagResult, Incoming, Verdict};

pub const DRAW: &str = "draw";
pub const STATS: &str = "router-stats";
pub const RELOAD: &str = "reload-router";
pub const ROUTE_IMAGE: &str = "Route: image";
pub const ROUTE_CHAT: &str = "Route: chat";

/// The command set, as registered.
pub fn definitions() -> Vec<CreateCommand> {
    let moderators = Permissions::MANAGE_MESSAGES;
    vec![
        CreateCommand::new(DRAW)
            .description("Draw a picture of exactly this prompt")
            .add_option(
                CreateCommandOption::new(CommandOptionType::String, "prompt", "What to draw")
                    .required(true)
                    .max_length(1500),
            ),
        CreateCommand::new(STATS)
            .description("Routing statistics (moderators)")
            .default_member_permissions(moderators),
        CreateCommand::new(RELOAD)
            .description("Load the promoted router adapter now (moderators)")
            .default_member_permissions(moderators),
        CreateCommand::new(ROUTE_IMAGE)
            .kind(CommandType::Message)
            .default_member_permissions(moderators),
        CreateCommand::new(ROUTE_CHAT)
            .kind(CommandType::Message)
            .default_member_permissions(moderators),
    ]
}

/// Registers the global commands, unless the same set was registered
/// before (registrations count against a daily limit).
pub async fn register(ctx: &Context, bot: &Bot) {
    let commands = definitions();
    let json = serde_json::to_string(&commands).unwrap_or_default();
    if std::fs::read_to_string(&bot.commands_file).is_ok_and(|old| old == json) {
        return;
    }
    match Command::set_global_commands(&ctx.http, commands).await {
        Ok(registered) => {
            tracing::info!(count = registered.len(), "application commands registered");
            if let Some(dir) = bot.commands_file.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = std::fs::write(&bot.commands_file, json) {
                tracing::warn!(error = %e, "cannot remember the registered commands");
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot register application commands"),
    }
}

/// Answers a command interaction.
pub async fn handle(bot: &Bot, ctx: &Context, cmd: &CommandInteraction) {
    let moderator = is_moderator(bot, cmd);
    match cmd.data.name.as_str() {
        DRAW => draw(bot, ctx, cmd).await,
        STATS if moderator => stats(bot, ctx, cmd).await,
        RELOAD if moderator => reload_router(bot, ctx, cmd).await,
        ROUTE_IMAGE if moderator => route_as(bot, ctx, cmd, RouteKind::Image).await,
        ROUTE_CHAT if moderator => route_as(bot, ctx, cmd, RouteKind::Chat).await,
        STATS | RELOAD | ROUTE_IMAGE | ROUTE_CHAT => {
            respond(ctx, cmd, "This command is for moderators.").await
        }
        other => tracing::debug!(command = other, "unknown command"),
    }
}

/// Moderator: one of the moderator roles, or Manage Messages in the channel
/// (Discord resolves the invoker's permissions for interactions).
fn is_moderator(bot: &Bot, cmd: &CommandInteraction) -> bool {
    let Some(member) = &cmd.member else {
        return false;
    };
    let roles = &bot.settings.moderator_role_ids;
    member.roles.iter().any(|r| roles.contains(&r.get()))
        || member
            .permissions
            .is_some_and(|p| p.manage_messages() || p.administrator())
}

/// An ephemeral one-line answer.
async fn respond(ctx: &Context, cmd: &CommandInteraction, text: &str) {
    let msg = CreateInteractionResponseMessage::new()
        .content(text)
        .ephemeral(true)
        .allowed_mentions(mentions());
    if let Err(e) = cmd
        .create_response(&ctx.http, CreateInteractionResponse::Message(msg))
        .await
    {
        tracing::warn!(command = %cmd.data.name, error = %e, "cannot answer a command");
    }
}

async fn draw(bot: &Bot, ctx: &Context, cmd: &CommandInteraction) {
    let prompt = cmd
        .data
        .options
        .iter()
        .find(|o| o.name == "prompt")
        .and_then(|o| o.value.as_str())
        .unwrap_or("")
        .trim()
        .to_string();
    if prompt.is_empty() {
        return respond(
            ctx,
            cmd,
            "Tell me what to draw: `/draw prompt: a cat in space`.",
        )
        .await;
    }
    let responder = &bot.responder;
    match responder.admit(cmd.user.id.get()) {
        Verdict::Allowed => {}
        Verdict::LimitedTell | Verdict::LimitedQuiet => {
            let text = render(&Answer::RateLimited).pieces.concat();
            return respond(ctx, cmd, &text).await;
        }
    }
    // A picture takes longer than the 3 s Discord allows: defer, then edit.
    if let Err(e) = cmd.defer(&ctx.http).await {
        tracing::warn!(error = %e, "cannot defer /draw");
        return;
    }
    let incoming = Incoming {
        user_message_id: cmd.id.get(),
        guild_id: cmd.guild_id.map(|g| g.get()),
        channel_id: cmd.channel_id.get(),
        author_id: cmd.user.id.get(),
        text: prompt.clone(),
        addressed: true,
    };
    responder.record_draw(&incoming, &prompt).await;
    let answer = responder.draw(&prompt).await;
    let mut edit = EditInteractionResponse::new().allowed_mentions(mentions());
    edit = edit.content(render(&answer).pieces.concat());
    if let Some(file) = attachment(&answer) {
        edit = edit.new_attachment(file);
    }
    match cmd.edit_response(&ctx.http, edit).await {
        Ok(sent) => responder.replied(cmd.id.get(), sent.id.get()).await,
        Err(e) => tracing::warn!(error = %e, "cannot deliver /draw"),
    }
}

async fn stats(bot: &Bot, ctx: &Context, cmd: &CommandInteraction) {
    let adapter = bot
        .responder
        .engine
        .adapter()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "none (base model)".into());
    let text = match bot.responder.stats().await {
        Ok(s) => format!(
            "Messages routed: {}\nImage: {} ({:.0}%), chat: {} ({:.0}%)\nFlags recorded: {} (live {})\nMedian routing latency: {:.0} ms\nAdapter in use: {adapter}",
            s.routed,
            s.image,
            share(s.image, s.routed),
            s.chat,
            share(s.chat, s.routed),
            s.flags_recorded,
            s.live_flags,
            s.median_latency_ms.unwrap_or(0.0),
        ),
        Err(e) => {
            tracing::error!(error = %e, "cannot read the record");
            "The routing record cannot be read right now.".to_string()
        }
    };
    respond(ctx, cmd, &text).await;
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

async fn reload_router(bot: &Bot, ctx: &Context, cmd: &CommandInteraction) {
    let Some(link) = &bot.adapter_link else {
        return respond(ctx, cmd, "No adapter is configured; nothing to reload.").await;
    };
    // Loading takes a moment: defer, then say what happened.
    if let Err(e) = cmd.defer_ephemeral(&ctx.http).await {
        tracing::warn!(error = %e, "cannot defer /reload-router");
        return;
    }
    let text = match reload(&bot.responder.engine, link, false).await {
        Ok(Reload::Swapped(p)) => format!("Now routing with {}.", p.display()),
        Ok(Reload::Unchanged(p)) => format!("Already routing with {}.", p.display()),
        Err(e) => {
            tracing::error!(error = %e, "reload refused");
            format!("Refused; the live adapter keeps serving: {e}")
        }
    };
    let edit = EditInteractionResponse::new().content(text);
    if let Err(e) = cmd.edit_response(&ctx.http, edit).await {
        tracing::warn!(error = %e, "cannot answer /reload-router");
    }
}

async fn route_as(bot: &Bot, ctx: &Context, cmd: &CommandInteraction, target: RouteKind) {
    let Some(message) = cmd.data.target_id.map(|t| MessageId::new(t.get())) else {
        return respond(ctx, cmd, "Use this on one of my replies.").await;
    };
    // The correction may draw a picture: answer first, then do the work.
    respond(ctx, cmd, "Noted; correcting the answer.").await;
    let result = apply_flag(bot, ctx, cmd.channel_id, message, cmd.user.id, target, true).await;
    if let FlagResult::Ignored(why) = result {
        let edit = EditInteractionResponse::new().content(format!("Nothing recorded: {why}."));
        if let Err(e) = cmd.edit_response(&ctx.http, edit).await {
            tracing::warn!(error = %e, "cannot answer a route command");
        }
    }
}
