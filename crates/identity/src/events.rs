//! The domain events identity emits (payloads in
//! `proto/keel/identity/v1/events.proto`), and its durable handlers: the
//! welcome email, and the email to the owner of an address someone tried
//! to register again.

use std::sync::Arc;

use async_trait::async_trait;
use keel_kernel::mail::{Mailer, OutgoingEmail};
use keel_kernel::{DomainEvent, Envelope, Error, EventHandler, Result};
use keel_proto::identity as pb;
use prost::Message;

/// Declares a domain event: a newtype over its payload message, named after
/// it (`UserDeleted` wraps `pb::UserDeleted`), its name, and whether the
/// audit log lists it.
macro_rules! domain_event {
    ($payload:ident, $event_name:literal, audited = $audited:literal) => {
        pub struct $payload(pub pb::$payload);

        impl DomainEvent for $payload {
            const NAME: &'static str = $event_name;
            const PAYLOAD_TYPE: &'static str = concat!("keel.identity.v1.", stringify!($payload));
            const AUDITED: bool = $audited;

            fn encode_payload(&self) -> Vec<u8> {
                self.0.encode_to_vec()
            }
        }
    };
}

domain_event!(UserRegistered, "identity.user.registered", audited = false);
domain_event!(RegistrationDuplicate, "identity.registration.duplicate", audited = true);
domain_event!(UserLoggedIn, "identity.user.logged_in", audited = false);
domain_event!(LoginFailed, "identity.login.failed", audited = true);
domain_event!(PasswordChanged, "identity.password.changed", audited = true);
domain_event!(RoleChanged, "identity.user.role_changed", audited = true);
domain_event!(UserUpdated, "identity.user.updated", audited = false);
domain_event!(SessionRevoked, "identity.session.revoked", audited = true);
domain_event!(UserDeleted, "identity.user.deleted", audited = true);
domain_event!(ApiKeyCreated, "identity.api_key.created", audited = true);
domain_event!(ApiKeyRevoked, "identity.api_key.revoked", audited = true);

/// Sends the welcome email on `identity.user.registered`. The event id is
/// the message id, so a redelivered event is the same message.
pub struct WelcomeEmail {
    mailer: Arc<dyn Mailer>,
}

impl WelcomeEmail {
    pub fn new(mailer: Arc<dyn Mailer>) -> Self {
        Self { mailer }
    }
}

#[async_trait]
impl EventHandler for WelcomeEmail {
    fn name(&self) -> &'static str {
        "identity.welcome_email"
    }

    fn topics(&self) -> Vec<&'static str> {
        vec![UserRegistered::NAME]
    }

    async fn handle(&self, event: &Envelope) -> Result<()> {
        let registered: pb::UserRegistered = event.payload(UserRegistered::PAYLOAD_TYPE).ok_or_else(|| {
            Error::internal(format!(
                "event {} has no readable UserRegistered payload",
                event.event_id
            ))
        })?;
        self.mailer
            .send(&OutgoingEmail {
                message_id: event.event_id.to_string(),
                to: registered.email.clone(),
                subject: "Welcome to Keel".to_owned(),
                text: format!(
                    "Hello {},\n\nyour account {} is ready.\n",
                    registered.display_name, registered.email
                ),
            })
            .await
    }
}

/// Tells the owner of an address that someone tried to register with it, on
/// `identity.registration.duplicate`: `Register` itself answers as for a new
/// account, so that it does not reveal which addresses have one. The event
/// id is the message id, as for [`WelcomeEmail`].
pub struct DuplicateRegistrationEmail {
    mailer: Arc<dyn Mailer>,
}

impl DuplicateRegistrationEmail {
    pub fn new(mailer: Arc<dyn Mailer>) -> Self {
        Self { mailer }
    }
}

#[async_trait]
impl EventHandler for DuplicateRegistrationEmail {
    fn name(&self) -> &'static str {
        "identity.duplicate_registration_email"
    }

    fn topics(&self) -> Vec<&'static str> {
        vec![RegistrationDuplicate::NAME]
    }

    async fn handle(&self, event: &Envelope) -> Result<()> {
        let duplicate: pb::RegistrationDuplicate =
            event.payload(RegistrationDuplicate::PAYLOAD_TYPE).ok_or_else(|| {
                Error::internal(format!(
                    "event {} has no readable RegistrationDuplicate payload",
                    event.event_id
                ))
            })?;
        self.mailer
            .send(&OutgoingEmail {
                message_id: event.event_id.to_string(),
                to: duplicate.email.clone(),
                subject: "Someone tried to register with your address".to_owned(),
                text: format!(
                    "Hello,\n\nsomeone tried to create a Keel account with {}, which already has one. \
                     If it was you, sign in with your password, or reset it if you have forgotten it. \
                     If it was not you, you can ignore this message: your account did not change.\n",
                    duplicate.email
                ),
            })
            .await
    }
}
