//! Mailer adapters: SMTP (lettre, `KEEL_SMTP_URL`) or, by default, a file in
//! the data directory with one JSON message per line.

use std::path::PathBuf;

use async_trait::async_trait;
use keel_kernel::mail::{Mailer, OutgoingEmail};
use keel_kernel::{Error, Result};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Appends each message to a file as a JSON line. A message id already in
/// the file is not written again, so redelivery is harmless.
pub struct FileMailer {
    path: PathBuf,
    // Appends are serialised so two lines never interleave.
    lock: Mutex<()>,
}

impl FileMailer {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }
}

#[async_trait]
impl Mailer for FileMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<()> {
        let _guard = self.lock.lock().await;
        let failed = |error: std::io::Error| Error::unavailable(format!("mail file {}: {error}", self.path.display()));
        let existing = match tokio::fs::read_to_string(&self.path).await {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(error) => return Err(failed(error)),
        };
        let marker = format!("\"message_id\":{}", serde_json::Value::String(email.message_id.clone()));
        if existing.lines().any(|line| line.contains(&marker)) {
            return Ok(());
        }
        let line = serde_json::json!({
            "message_id": email.message_id,
            "to": email.to,
            "subject": email.subject,
            "text": email.text,
            "sent_at": keel_kernel::clock::now(),
        });
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .await
            .map_err(failed)?;
        file.write_all(format!("{line}\n").as_bytes()).await.map_err(failed)?;
        file.flush().await.map_err(failed)
    }
}

/// Sends through an SMTP relay (`smtp://user:pass@host:port`).
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl SmtpMailer {
    pub fn new(url: &str, from: &str) -> anyhow::Result<Self> {
        let invalid = || anyhow::anyhow!("KEEL_SMTP_URL must look like smtp://[user:password@]host[:port]");
        let rest = url.strip_prefix("smtp://").ok_or_else(invalid)?;
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials), address),
            None => (None, rest),
        };
        let (host, port) = match address.trim_end_matches('/').rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| invalid())?),
            None => (address.trim_end_matches('/'), 25),
        };
        if host.is_empty() {
            return Err(invalid());
        }
        // Plain SMTP to a relay the operator runs (TLS is the relay's job):
        // keel is built without a TLS stack.
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host).port(port);
        if let Some(credentials) = credentials {
            let (user, password) = credentials.split_once(':').ok_or_else(invalid)?;
            builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                user.to_owned(),
                password.to_owned(),
            ));
        }
        let transport = builder.build();
        let from = from
            .parse()
            .map_err(|error| anyhow::anyhow!("KEEL_MAIL_FROM: {error}"))?;
        Ok(Self { transport, from })
    }
}

#[async_trait]
impl Mailer for SmtpMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<()> {
        let to: Mailbox = email
            .to
            .parse()
            .map_err(|error| Error::internal(format!("bad recipient: {error}")))?;
        let message = Message::builder()
            .message_id(Some(format!("<{}@keel>", email.message_id)))
            .from(self.from.clone())
            .to(to)
            .subject(email.subject.clone())
            .body(email.text.clone())
            .map_err(|error| Error::internal(format!("unbuildable email: {error}")))?;
        self.transport
            .send(message)
            .await
            .map(|_| ())
            .map_err(|error| Error::unavailable(format!("smtp: {error}")))
    }
}
