//! Thin tonic adapters: proto request -> command or query -> bus -> proto.

use keel_kernel::grpc::{context, timestamp};
use keel_kernel::{Bus, Error, Role, Secret, Violations, id::parse_id};
use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_server::{IdentityCommandService, IdentityCommandServiceServer};
use keel_proto::identity::identity_query_service_server::{IdentityQueryService, IdentityQueryServiceServer};
use tonic::{Request, Response, Status};

use crate::commands::{
    ChangePassword, CreateUser, DeleteUser, IssuedTokens, Login, LoginOutcome, Logout, RefreshOutcome, RefreshSession,
    Register, RevokeSession, UpdateUser,
};
use crate::model::{DisplayName, Email, NewPassword};
use crate::queries::{GetCurrentUser, GetJwks, GetUser, ListSessions, ListUsers};
use crate::store::{Session, User};

pub struct CommandApi {
    bus: Bus,
}

pub struct QueryApi {
    bus: Bus,
}

/// The two gRPC services of identity, ready to be added to a router.
pub fn services(
    bus: &Bus,
) -> (
    IdentityCommandServiceServer<CommandApi>,
    IdentityQueryServiceServer<QueryApi>,
) {
    (
        IdentityCommandServiceServer::new(CommandApi { bus: bus.clone() }),
        IdentityQueryServiceServer::new(QueryApi { bus: bus.clone() }),
    )
}

fn user_to_proto(user: &User) -> pb::User {
    pb::User {
        id: user.id.to_string(),
        email: user.email.clone(),
        display_name: user.display_name.clone(),
        role: Role::parse(&user.role).map_or(pb::Role::Unspecified, role_to_proto) as i32,
        created_at: Some(timestamp(user.created_at)),
        updated_at: Some(timestamp(user.updated_at)),
    }
}

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::User => pb::Role::User,
        Role::Moderator => pb::Role::Moderator,
        Role::Admin => pb::Role::Admin,
    }
}

fn role_from_proto(field: &str, value: i32) -> keel_kernel::Result<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::User) => Ok(Role::User),
        Ok(pb::Role::Moderator) => Ok(Role::Moderator),
        Ok(pb::Role::Admin) => Ok(Role::Admin),
        _ => Err(Error::invalid_field(
            field,
            "must be ROLE_USER, ROLE_MODERATOR or ROLE_ADMIN",
        )),
    }
}

fn tokens_to_proto(tokens: IssuedTokens) -> pb::AuthTokens {
    pb::AuthTokens {
        access_token: tokens.access_token.expose().clone(),
        access_token_expires_at: Some(timestamp(tokens.access_token_expires_at)),
        refresh_token: tokens.refresh_token.expose().clone(),
        refresh_token_expires_at: Some(timestamp(tokens.refresh_token_expires_at)),
        token_type: "Bearer".to_owned(),
        session_id: tokens.session_id.to_string(),
    }
}

fn session_to_proto(session: &Session, current: uuid::Uuid) -> pb::Session {
    pb::Session {
        id: session.id.to_string(),
        created_at: Some(timestamp(session.created_at)),
        last_refreshed_at: Some(timestamp(session.last_refreshed_at)),
        expires_at: Some(timestamp(session.expires_at)),
        user_agent: session.user_agent.clone(),
        ip_address: session.ip_address.clone(),
        current: session.id == current,
    }
}

fn required_secret(violations: &mut Violations, field: &str, value: String) -> Option<Secret<String>> {
    if value.is_empty() {
        violations.take::<()>(Err(Error::invalid_field(field, "is required")));
        return None;
    }
    Some(Secret::new(value))
}

#[tonic::async_trait]
impl IdentityCommandService for CommandApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let mut violations = Violations::new();
        let email = violations.take(Email::parse("email", &request.email));
        let password = violations.take(NewPassword::parse("password", &request.password));
        let display_name = violations.take(DisplayName::parse("display_name", &request.display_name));
        let (Some(email), Some(password), Some(display_name)) = (email, password, display_name) else {
            return Err(violations.into_error().into());
        };
        let user = self
            .bus
            .execute(
                &ctx,
                Register {
                    email,
                    password,
                    display_name,
                },
            )
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let mut violations = Violations::new();
        let email = violations.take(Email::parse("email", &request.email));
        let password = required_secret(&mut violations, "password", request.password);
        let (Some(email), Some(password)) = (email, password) else {
            return Err(violations.into_error().into());
        };
        match self.bus.execute(&ctx, Login { email, password }).await? {
            LoginOutcome::SignedIn(user, tokens) => Ok(Response::new(pb::LoginResponse {
                tokens: Some(tokens_to_proto(tokens)),
                user: Some(user_to_proto(&user)),
            })),
            LoginOutcome::Refused => Err(Error::unauthenticated("invalid email or password").into()),
        }
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        let ctx = context(&request);
        let mut violations = Violations::new();
        let Some(refresh_token) = required_secret(&mut violations, "refresh_token", request.into_inner().refresh_token)
        else {
            return Err(violations.into_error().into());
        };
        match self.bus.execute(&ctx, RefreshSession { refresh_token }).await? {
            RefreshOutcome::Rotated(tokens) => Ok(Response::new(pb::RefreshSessionResponse {
                tokens: Some(tokens_to_proto(tokens)),
            })),
            RefreshOutcome::ReuseDetected => {
                Err(Error::unauthenticated("refresh token was already used; the session has been revoked").into())
            }
        }
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let ctx = context(&request);
        self.bus.execute(&ctx, Logout).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let mut violations = Violations::new();
        let current_password = required_secret(&mut violations, "current_password", request.current_password);
        let new_password = violations.take(NewPassword::parse("new_password", &request.new_password));
        let (Some(current_password), Some(new_password)) = (current_password, new_password) else {
            return Err(violations.into_error().into());
        };
        self.bus
            .execute(
                &ctx,
                ChangePassword {
                    current_password,
                    new_password,
                },
            )
            .await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let mut violations = Violations::new();
        let email = violations.take(Email::parse("email", &request.email));
        let password = violations.take(NewPassword::parse("password", &request.password));
        let display_name = violations.take(DisplayName::parse("display_name", &request.display_name));
        let role = if request.role == pb::Role::Unspecified as i32 {
            Some(Role::User)
        } else {
            violations.take(role_from_proto("role", request.role))
        };
        let (Some(email), Some(password), Some(display_name), Some(role)) = (email, password, display_name, role)
        else {
            return Err(violations.into_error().into());
        };
        let user = self
            .bus
            .execute(
                &ctx,
                CreateUser {
                    email,
                    password,
                    display_name,
                    role,
                },
            )
            .await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let user = request
            .user
            .ok_or_else(|| Error::invalid_field("user", "is required"))?;
        let id = parse_id("user.id", &user.id)?;
        // AIP-134: without a mask, every populated field is written.
        let paths: Vec<String> = match request.update_mask {
            Some(mask) if !mask.paths.is_empty() => mask.paths,
            _ => [
                (!user.email.is_empty()).then_some("email"),
                (!user.display_name.is_empty()).then_some("display_name"),
                (user.role != pb::Role::Unspecified as i32).then_some("role"),
            ]
            .into_iter()
            .flatten()
            .map(str::to_owned)
            .collect(),
        };
        if paths.is_empty() {
            return Err(Error::invalid_field("update_mask", "names no field to update").into());
        }
        let mut violations = Violations::new();
        let mut command = UpdateUser {
            id,
            email: None,
            display_name: None,
            role: None,
        };
        for path in &paths {
            match path.as_str() {
                "email" => command.email = violations.take(Email::parse("user.email", &user.email)),
                "display_name" => {
                    command.display_name = violations.take(DisplayName::parse("user.display_name", &user.display_name))
                }
                "role" => command.role = violations.take(role_from_proto("user.role", user.role)),
                "id" | "created_at" | "updated_at" => {
                    violations.take::<()>(Err(Error::invalid_field(
                        format!("update_mask.{path}"),
                        "is output only",
                    )));
                }
                _ => {
                    violations.take::<()>(Err(Error::invalid_field(
                        format!("update_mask.{path}"),
                        "is not a field of User that can be updated (email, display_name, role)",
                    )));
                }
            }
        }
        let invalid = paths.iter().any(|path| match path.as_str() {
            "email" => command.email.is_none(),
            "display_name" => command.display_name.is_none(),
            "role" => command.role.is_none(),
            _ => true,
        });
        if invalid {
            return Err(violations.into_error().into());
        }
        let user = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let ctx = context(&request);
        let id = parse_id("id", &request.get_ref().id)?;
        self.bus.execute(&ctx, DeleteUser { id }).await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let ctx = context(&request);
        let id = parse_id("id", &request.get_ref().id)?;
        self.bus.execute(&ctx, RevokeSession { id }).await?;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }
}

#[tonic::async_trait]
impl IdentityQueryService for QueryApi {
    async fn get_current_user(
        &self,
        request: Request<pb::GetCurrentUserRequest>,
    ) -> Result<Response<pb::GetCurrentUserResponse>, Status> {
        let ctx = context(&request);
        let user = self.bus.ask(&ctx, GetCurrentUser).await?;
        Ok(Response::new(pb::GetCurrentUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::GetUserResponse>, Status> {
        let ctx = context(&request);
        let id = parse_id("id", &request.get_ref().id)?;
        let user = self.bus.ask(&ctx, GetUser { id }).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let ctx = context(&request);
        let request = request.into_inner();
        let page = self
            .bus
            .ask(
                &ctx,
                ListUsers {
                    page_size: request.page_size,
                    page_token: request.page_token,
                    query: request.query,
                    order_by: request.order_by,
                },
            )
            .await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: page.users.iter().map(user_to_proto).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let ctx = context(&request);
        let current = ctx
            .principal
            .as_ref()
            .map(|principal| principal.session_id)
            .unwrap_or_default();
        let sessions = self.bus.ask(&ctx, ListSessions).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions
                .iter()
                .map(|session| session_to_proto(session, current))
                .collect(),
        }))
    }

    async fn get_jwks(&self, request: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        let ctx = context(&request);
        let keys = self.bus.ask(&ctx, GetJwks).await?;
        Ok(Response::new(pb::GetJwksResponse {
            keys: keys
                .into_iter()
                .map(|key| pb::JsonWebKey {
                    kty: "OKP".to_owned(),
                    crv: "Ed25519".to_owned(),
                    x: key.x,
                    kid: key.kid,
                    alg: "EdDSA".to_owned(),
                    r#use: "sig".to_owned(),
                })
                .collect(),
        }))
    }
}
