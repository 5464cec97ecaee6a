//! Mailer adapters: SMTP (lettre, `KEEL_SMTP_URL`) or, by default, a file in
//! the data directory with one JSON message per line; either behind
//! [`GuardedMailer`], the kernel's outbound policy (timeout, retries,
//! circuit breaker).

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use keel_kernel::mail::{Mailer, OutgoingEmail};
use keel_kernel::outbound::{Breaker, Outbound};
use keel_kernel::{Code, Error, Result, Secret};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// A mailer under the outbound policy: each send is timed out, retried on
/// transient failures, and refused at once while the relay's breaker is
/// open (the handler or job that sends retries later, by its own policy).
pub struct GuardedMailer {
    inner: Arc<dyn Mailer>,
    outbound: Outbound,
}

impl GuardedMailer {
    pub fn new(inner: Arc<dyn Mailer>, outbound: Outbound) -> Self {
        Self { inner, outbound }
    }

    pub fn breaker(&self) -> &Arc<Breaker> {
        self.outbound.breaker()
    }
}

#[async_trait]
impl Mailer for GuardedMailer {
    async fn send(&self, email: &OutgoingEmail) -> Result<()> {
        self.outbound.call(|| self.inner.send(email)).await
    }
}

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
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).append(true);
        // Sign-in and reset links: the keel user's alone.
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(&self.path).await.map_err(failed)?;
        file.write_all(format!("{line}\n").as_bytes()).await.map_err(failed)?;
        file.flush().await.map_err(failed)
    }
}

/// Sends through an SMTP relay (`smtp://user:pass@host:port`).
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// Where and as whom to send: `KEEL_SMTP_URL` read by the `url` crate, with
/// the user and password percent-decoded (a `@` in a password is `%40`).
#[derive(PartialEq, Eq)]
pub(crate) struct SmtpSettings {
    host: String,
    port: u16,
    credentials: Option<(String, Secret<String>)>,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .finish_non_exhaustive()
    }
}

impl SmtpSettings {
    // lettre's own `AsyncSmtpTransport::from_url` does the same, but exists
    // only with one of its TLS features, and keel is built without a TLS
    // stack (see `SmtpMailer::new`).
    /// The settings, or why `url` is not `smtp://[user:password@]host[:port]`
    /// (never quoting the URL: it may hold a password).
    pub(crate) fn parse(url: &str) -> Result<SmtpSettings, String> {
        let invalid = |why: &str| format!("must look like smtp://[user:password@]host[:port]: {why}");
        let parsed = url::Url::parse(url).map_err(|error| invalid(&error.to_string()))?;
        if parsed.scheme() != "smtp" {
            return Err(invalid("the scheme is not smtp (keel speaks plain SMTP to a relay)"));
        }
        if !parsed.path().trim_matches('/').is_empty() || parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(invalid("it has a path, query or fragment"));
        }
        let host = parsed
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| invalid("no host"))?
            .to_owned();
        let decode = |part: &str, what: &str| {
            percent_encoding::percent_decode_str(part)
                .decode_utf8()
                .map(std::borrow::Cow::into_owned)
                .map_err(|_| invalid(&format!("the {what} is not UTF-8 once percent-decoded")))
        };
        let credentials = match (parsed.username(), parsed.password()) {
            ("", None) => None,
            (user, Some(password)) => Some((decode(user, "user")?, Secret::new(decode(password, "password")?))),
            (_, None) => return Err(invalid("a user without a password")),
        };
        Ok(SmtpSettings {
            host,
            port: parsed.port().unwrap_or(25),
            credentials,
        })
    }
}

impl SmtpMailer {
    pub fn new(url: &str, from: &str) -> anyhow::Result<Self> {
        let settings = SmtpSettings::parse(url).map_err(|reason| anyhow::anyhow!("KEEL_SMTP_URL {reason}"))?;
        // Plain SMTP to a relay the operator runs (TLS is the relay's job):
        // keel is built without a TLS stack.
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(settings.host).port(settings.port);
        if let Some((user, password)) = settings.credentials {
            builder = builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                user,
                password.expose().clone(),
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
        self.transport.send(message).await.map(|_| ()).map_err(|error| {
            // A 5xx is the relay refusing this message: not the relay being
            // down, so not a failure for the circuit breaker.
            if error.is_permanent() {
                Error::new(Code::FailedPrecondition, "the mail relay refused the message")
                    .with_cause(format!("smtp: {error}"))
            } else {
                Error::unavailable(format!("smtp: {error}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(host: &str, port: u16, credentials: Option<(&str, &str)>) -> SmtpSettings {
        SmtpSettings {
            host: host.to_owned(),
            port,
            credentials: credentials.map(|(user, password)| (user.to_owned(), Secret::new(password.to_owned()))),
        }
    }

    #[test]
    fn smtp_urls_are_read_with_percent_decoded_credentials() {
        assert_eq!(
            SmtpSettings::parse("smtp://mail.internal").unwrap(),
            settings("mail.internal", 25, None)
        );
        assert_eq!(
            SmtpSettings::parse("smtp://keel:p%40ss%3Aw0rd@mail.internal:2525/").unwrap(),
            settings("mail.internal", 2525, Some(("keel", "p@ss:w0rd")))
        );
        assert_eq!(
            SmtpSettings::parse("smtp://ops%40example.com:secret@127.0.0.1:587").unwrap(),
            settings("127.0.0.1", 587, Some(("ops@example.com", "secret")))
        );
    }

    #[test]
    fn bad_smtp_urls_are_refused() {
        for url in [
            "mail.internal",
            "smtps://mail.internal",
            "smtp://",
            "smtp://mail.internal:99999",
            "smtp://keel@mail.internal",
            "smtp://mail.internal/x",
            "smtp://mail.internal?tls=required",
            "smtp://u:%FF@mail.internal",
        ] {
            assert!(SmtpSettings::parse(url).is_err(), "{url}");
        }
    }

    #[test]
    fn the_password_stays_out_of_debug() {
        let settings = SmtpSettings::parse("smtp://keel:hunter2@mail.internal").unwrap();
        assert!(!format!("{settings:?}").contains("hunter2"));
    }
}
