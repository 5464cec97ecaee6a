//! Account administration shared by `keel users create` and the bootstrap admin.

use keel_identity::commands::CreateUser;
use keel_identity::model::{DisplayName, Email, NewPassword};
pub use keel_kernel::Role;
use keel_kernel::{Bus, Code};

/// Creates an account through the command bus, as a trusted caller.
pub async fn create_user(
    bus: &Bus,
    email: &str,
    password: &str,
    display_name: Option<&str>,
    role: Role,
) -> anyhow::Result<uuid::Uuid> {
    let email = Email::parse("email", email)?;
    let password = NewPassword::parse("password", password)?;
    let default_name = email.as_str().split('@').next().unwrap_or("admin").to_owned();
    let display_name = DisplayName::parse("display_name", display_name.unwrap_or(&default_name))?;
    let user = bus
        .execute(
            &crate::app::system_context(),
            CreateUser {
                email,
                password,
                display_name,
                role,
            },
        )
        .await?;
    Ok(user.id)
}

/// True when it created the admin, false when the email was already taken.
pub async fn create_admin_if_missing(bus: &Bus, email: &str, password: &str) -> anyhow::Result<bool> {
    match create_user(bus, email, password, None, Role::Admin).await {
        Ok(_) => Ok(true),
        Err(error)
            if error
                .downcast_ref::<keel_kernel::Error>()
                .is_some_and(|e| e.code() == Code::AlreadyExists) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}
