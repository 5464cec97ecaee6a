//! The writes of the events module.

use async_trait::async_trait;
use keel_kernel::{Command, CommandContext, CommandHandler, Result};
use uuid::Uuid;

use crate::Events;

pub struct ReplayDeadLetter {
    pub id: Uuid,
}

impl Command for ReplayDeadLetter {
    const NAME: &'static str = "events.replay_dead_letter";
    type Output = ();
}

#[async_trait]
impl CommandHandler<ReplayDeadLetter> for Events {
    async fn handle(&self, ctx: &CommandContext<'_>, command: ReplayDeadLetter) -> Result<()> {
        ctx.request.require_admin()?;
        crate::handlers::replay(ctx.db, &self.registry, command.id).await
    }
}
