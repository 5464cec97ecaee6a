//! The mailer port: modules send email through it; the server picks an
//! adapter (SMTP, or a file in the data directory).

use async_trait::async_trait;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    /// Unique per message; a resend with the same id is the same message
    /// (handlers pass the event id, which makes delivery idempotent).
    pub message_id: String,
    pub to: String,
    pub subject: String,
    pub text: String,
}

#[async_trait]
pub trait Mailer: Send + Sync + 'static {
    async fn send(&self, email: &OutgoingEmail) -> Result<()>;
}
