//! Account administration for in-process callers: `keel users create` and
//! the bootstrap admin at start-up. Both go through the command bus as a
//! trusted caller, so they obey the same rules and emit the same events as
//! `CreateUser` over gRPC.

pub use keel_kernel::Role;
use keel_kernel::{Bus, Code, RequestContext, Result};

use crate::commands::CreateUser;
use crate::model::User;

/// Creates an account. Without a display name, the email's local part is used.
pub async fn create_user(
    bus: &Bus,
    email: &str,
    password: &str,
    display_name: Option<&str>,
    role: Role,
) -> Result<User> {
    let local_part = email.trim().split('@').next().unwrap_or_default();
    let command = CreateUser::parse(email, password, display_name.unwrap_or(local_part), Ok(role))?;
    bus.execute(&RequestContext::system(), command).await
}

/// Creates an admin unless the email is taken: true when it created one.
pub async fn create_admin_if_missing(bus: &Bus, email: &str, password: &str) -> Result<bool> {
    match create_user(bus, email, password, None, Role::Admin).await {
        Ok(_) => Ok(true),
        Err(error) if error.code() == Code::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}
