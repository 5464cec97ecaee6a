//! Thin tonic adapters: proto request -> command or query (`TryFrom`) -> bus
//! -> proto (`From`). The field names and messages of every violation are
//! part of the contract: clients and tests read them.

use keel_kernel::grpc::{GrpcRoutes, checked, context, parse, timestamp};
use keel_kernel::{Bus, Error, Result, Role, Secret, Violations, id::parse_id};
use keel_proto::identity as pb;
use keel_proto::identity::identity_command_service_server::{IdentityCommandService, IdentityCommandServiceServer};
use keel_proto::identity::identity_query_service_server::{IdentityQueryService, IdentityQueryServiceServer};
use tonic::{Request, Response, Status};

use crate::commands::{
    ChangePassword, CreateApiKey, CreateUser, DeleteUser, IssuedTokens, Login, LoginOutcome, Logout, RefreshOutcome,
    RefreshSession, Register, RevokeApiKey, RevokeSession, UpdateUser,
};
use crate::model::{ApiKey, ApiKeyName, DisplayName, Email, NewPassword};
use crate::model::{Session, User};
use crate::queries::{GetCurrentUser, GetJwks, GetUser, ListApiKeys, ListSessions, ListUsers};
use crate::tokens::PublicJwk;
use uuid::Uuid;

pub struct CommandApi {
    bus: Bus,
}

pub struct QueryApi {
    bus: Bus,
}

/// The full names of identity's gRPC services.
pub const SERVICES: &[&str] = &[
    <IdentityCommandServiceServer<CommandApi> as tonic::server::NamedService>::NAME,
    <IdentityQueryServiceServer<QueryApi> as tonic::server::NamedService>::NAME,
];

/// Adds identity's two gRPC services, with the server's limits and compression.
pub fn add_services(bus: &Bus, routes: &mut GrpcRoutes) {
    let limits = routes.limits();
    routes
        .add(keel_kernel::grpc_server!(
            IdentityCommandServiceServer::new(CommandApi { bus: bus.clone() }),
            limits
        ))
        .add(keel_kernel::grpc_server!(
            IdentityQueryServiceServer::new(QueryApi { bus: bus.clone() }),
            limits
        ));
}

// Proto -> domain. Each request parses into its command or query, naming
// every invalid field at once (INVALID_ARGUMENT with field violations).

fn role_from_proto(field: &str, value: i32) -> Result<Role> {
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

fn required_secret(field: &str, value: String) -> Result<Secret<String>> {
    if value.is_empty() {
        return Err(Error::invalid_field(field, "is required"));
    }
    Ok(Secret::new(value))
}

impl TryFrom<pb::RegisterRequest> for Register {
    type Error = Error;

    fn try_from(request: pb::RegisterRequest) -> Result<Register> {
        Register::parse(&request.email, &request.password, &request.display_name)
    }
}

impl TryFrom<pb::LoginRequest> for Login {
    type Error = Error;

    fn try_from(request: pb::LoginRequest) -> Result<Login> {
        let mut violations = Violations::new();
        let email = violations.take(Email::parse("email", &request.email));
        let password = violations.take(required_secret("password", request.password));
        match (email, password) {
            (Some(email), Some(password)) => Ok(Login { email, password }),
            _ => Err(violations.into_error()),
        }
    }
}

impl TryFrom<pb::RefreshSessionRequest> for RefreshSession {
    type Error = Error;

    fn try_from(request: pb::RefreshSessionRequest) -> Result<RefreshSession> {
        Ok(RefreshSession {
            refresh_token: required_secret("refresh_token", request.refresh_token)?,
        })
    }
}

impl TryFrom<pb::ChangePasswordRequest> for ChangePassword {
    type Error = Error;

    fn try_from(request: pb::ChangePasswordRequest) -> Result<ChangePassword> {
        let mut violations = Violations::new();
        let current_password = violations.take(required_secret("current_password", request.current_password));
        let new_password = violations.take(NewPassword::parse("new_password", &request.new_password));
        match (current_password, new_password) {
            (Some(current_password), Some(new_password)) => Ok(ChangePassword {
                current_password,
                new_password,
            }),
            _ => Err(violations.into_error()),
        }
    }
}

impl TryFrom<pb::CreateUserRequest> for CreateUser {
    type Error = Error;

    fn try_from(request: pb::CreateUserRequest) -> Result<CreateUser> {
        let role = if request.role == pb::Role::Unspecified as i32 {
            Ok(Role::User)
        } else {
            role_from_proto("role", request.role)
        };
        CreateUser::parse(&request.email, &request.password, &request.display_name, role)
    }
}

impl TryFrom<pb::UpdateUserRequest> for UpdateUser {
    type Error = Error;

    /// AIP-134: the mask names the fields to write; without one, every
    /// populated field is written. Output-only and unknown paths are refused.
    fn try_from(request: pb::UpdateUserRequest) -> Result<UpdateUser> {
        let user = request
            .user
            .ok_or_else(|| Error::invalid_field("user", "is required"))?;
        let id = parse_id("user.id", &user.id)?;
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
            return Err(Error::invalid_field("update_mask", "names no field to update"));
        }
        let mut violations = Violations::new();
        let mut command = UpdateUser {
            id,
            email: None,
            display_name: None,
            role: None,
        };
        let mut complete = true;
        for path in &paths {
            let parsed = match path.as_str() {
                "email" => {
                    command.email = violations.take(Email::parse("user.email", &user.email));
                    command.email.is_some()
                }
                "display_name" => {
                    command.display_name = violations.take(DisplayName::parse("user.display_name", &user.display_name));
                    command.display_name.is_some()
                }
                "role" => {
                    command.role = violations.take(role_from_proto("user.role", user.role));
                    command.role.is_some()
                }
                "id" | "created_at" | "updated_at" => {
                    violations.take::<()>(Err(Error::invalid_field(
                        format!("update_mask.{path}"),
                        "is output only",
                    )));
                    false
                }
                _ => {
                    violations.take::<()>(Err(Error::invalid_field(
                        format!("update_mask.{path}"),
                        "is not a field of User that can be updated (email, display_name, role)",
                    )));
                    false
                }
            };
            complete &= parsed;
        }
        if complete {
            Ok(command)
        } else {
            Err(violations.into_error())
        }
    }
}

impl TryFrom<pb::DeleteUserRequest> for DeleteUser {
    type Error = Error;

    fn try_from(request: pb::DeleteUserRequest) -> Result<DeleteUser> {
        Ok(DeleteUser {
            id: parse_id("id", &request.id)?,
        })
    }
}

impl TryFrom<pb::RevokeSessionRequest> for RevokeSession {
    type Error = Error;

    fn try_from(request: pb::RevokeSessionRequest) -> Result<RevokeSession> {
        Ok(RevokeSession {
            id: parse_id("id", &request.id)?,
        })
    }
}

impl TryFrom<pb::GetUserRequest> for GetUser {
    type Error = Error;

    fn try_from(request: pb::GetUserRequest) -> Result<GetUser> {
        Ok(GetUser {
            id: parse_id("id", &request.id)?,
        })
    }
}

impl From<pb::ListUsersRequest> for ListUsers {
    fn from(request: pb::ListUsersRequest) -> ListUsers {
        ListUsers {
            page_size: request.page_size,
            page_token: request.page_token,
            query: request.query,
            order_by: request.order_by,
        }
    }
}

impl TryFrom<pb::CreateApiKeyRequest> for CreateApiKey {
    type Error = Error;

    fn try_from(request: pb::CreateApiKeyRequest) -> Result<CreateApiKey> {
        let mut violations = Violations::new();
        let name = violations.take(ApiKeyName::parse("name", &request.name));
        let role = violations.take(if request.role == pb::Role::Unspecified as i32 {
            Ok(Role::User)
        } else {
            role_from_proto("role", request.role)
        });
        let expires_at = violations.take(match request.expires_at {
            None => Ok(None),
            Some(time) => chrono::DateTime::from_timestamp(time.seconds, u32::try_from(time.nanos).unwrap_or(u32::MAX))
                .map(Some)
                .ok_or_else(|| Error::invalid_field("expires_at", "is not a valid timestamp")),
        });
        match (name, role, expires_at) {
            (Some(name), Some(role), Some(expires_at)) => Ok(CreateApiKey { name, role, expires_at }),
            _ => Err(violations.into_error()),
        }
    }
}

impl TryFrom<pb::RevokeApiKeyRequest> for RevokeApiKey {
    type Error = Error;

    fn try_from(request: pb::RevokeApiKeyRequest) -> Result<RevokeApiKey> {
        Ok(RevokeApiKey {
            id: parse_id("id", &request.id)?,
        })
    }
}

impl From<pb::ListApiKeysRequest> for ListApiKeys {
    fn from(request: pb::ListApiKeysRequest) -> ListApiKeys {
        ListApiKeys {
            page_size: request.page_size,
            page_token: request.page_token,
        }
    }
}

// Domain -> proto.

impl From<&ApiKey> for pb::ApiKey {
    fn from(key: &ApiKey) -> pb::ApiKey {
        pb::ApiKey {
            id: key.id.to_string(),
            name: key.name.as_str().to_owned(),
            role: role_to_proto(key.role) as i32,
            prefix: key.prefix(),
            created_at: Some(timestamp(key.created_at)),
            expires_at: key.expires_at.map(timestamp),
            last_used_at: key.last_used_at.map(timestamp),
            revoked_at: key.revoked_at.map(timestamp),
            created_by: key.created_by.to_string(),
        }
    }
}

fn role_to_proto(role: Role) -> pb::Role {
    match role {
        Role::User => pb::Role::User,
        Role::Moderator => pb::Role::Moderator,
        Role::Admin => pb::Role::Admin,
    }
}

impl From<&User> for pb::User {
    fn from(user: &User) -> pb::User {
        pb::User {
            id: user.id.to_string(),
            email: user.email.as_str().to_owned(),
            display_name: user.display_name.as_str().to_owned(),
            role: role_to_proto(user.role) as i32,
            created_at: Some(timestamp(user.created_at)),
            updated_at: Some(timestamp(user.updated_at)),
        }
    }
}

impl From<IssuedTokens> for pb::AuthTokens {
    fn from(tokens: IssuedTokens) -> pb::AuthTokens {
        pb::AuthTokens {
            access_token: tokens.access_token.expose().clone(),
            access_token_expires_at: Some(timestamp(tokens.access_token_expires_at)),
            refresh_token: tokens.refresh_token.expose().clone(),
            refresh_token_expires_at: Some(timestamp(tokens.refresh_token_expires_at)),
            token_type: "Bearer".to_owned(),
            session_id: tokens.session_id.to_string(),
        }
    }
}

/// A session as its owner sees it: `current` marks the one making the call.
fn session_to_proto(session: &Session, current: Option<Uuid>) -> pb::Session {
    pb::Session {
        id: session.id.to_string(),
        created_at: Some(timestamp(session.created_at)),
        last_refreshed_at: Some(timestamp(session.last_refreshed_at)),
        expires_at: Some(timestamp(session.expires_at)),
        user_agent: session.user_agent.clone(),
        ip_address: session.ip_address.clone(),
        current: Some(session.id) == current,
    }
}

impl From<PublicJwk> for pb::JsonWebKey {
    fn from(key: PublicJwk) -> pb::JsonWebKey {
        pb::JsonWebKey {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: key.x,
            kid: key.kid,
            alg: "EdDSA".to_owned(),
            r#use: "sig".to_owned(),
        }
    }
}

#[tonic::async_trait]
impl IdentityCommandService for CommandApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, Register>(request.into_inner())?;
        let user = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::RegisterResponse {
            user: Some((&user).into()),
        }))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, Login>(request.into_inner())?;
        match self.bus.execute(&ctx, command).await? {
            LoginOutcome::SignedIn { user, tokens } => Ok(Response::new(pb::LoginResponse {
                tokens: Some(tokens.into()),
                user: Some(user.as_ref().into()),
            })),
            LoginOutcome::Refused => Err(Error::unauthenticated("invalid email or password").into()),
        }
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::RefreshSessionResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, RefreshSession>(request.into_inner())?;
        match self.bus.execute(&ctx, command).await? {
            RefreshOutcome::Rotated(tokens) => Ok(Response::new(pb::RefreshSessionResponse {
                tokens: Some(tokens.into()),
            })),
            RefreshOutcome::ReuseDetected => {
                Err(Error::unauthenticated("refresh token was already used; the session has been revoked").into())
            }
        }
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        self.bus.execute(&ctx, Logout).await?;
        Ok(Response::new(pb::LogoutResponse {}))
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, ChangePassword>(request.into_inner())?;
        self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::ChangePasswordResponse {}))
    }

    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, CreateUser>(request.into_inner())?;
        let user = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::CreateUserResponse {
            user: Some((&user).into()),
        }))
    }

    async fn update_user(
        &self,
        request: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::UpdateUserResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, UpdateUser>(request.into_inner())?;
        let user = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::UpdateUserResponse {
            user: Some((&user).into()),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, DeleteUser>(request.into_inner())?;
        self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::DeleteUserResponse {}))
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, RevokeSession>(request.into_inner())?;
        self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::RevokeSessionResponse {}))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, CreateApiKey>(request.into_inner())?;
        let created = self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some((&created.api_key).into()),
            key: created.key.expose().clone(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        let ctx = context(&request);
        let command = parse::<_, RevokeApiKey>(request.into_inner())?;
        self.bus.execute(&ctx, command).await?;
        Ok(Response::new(pb::RevokeApiKeyResponse {}))
    }
}

#[tonic::async_trait]
impl IdentityQueryService for QueryApi {
    async fn get_current_user(
        &self,
        request: Request<pb::GetCurrentUserRequest>,
    ) -> Result<Response<pb::GetCurrentUserResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let user = self.bus.ask(&ctx, GetCurrentUser).await?;
        Ok(Response::new(pb::GetCurrentUserResponse {
            user: Some((&user).into()),
        }))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::GetUserResponse>, Status> {
        let ctx = context(&request);
        let query = parse::<_, GetUser>(request.into_inner())?;
        let user = self.bus.ask(&ctx, query).await?;
        Ok(Response::new(pb::GetUserResponse {
            user: Some((&user).into()),
        }))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let page = self.bus.ask(&ctx, ListUsers::from(request.into_inner())).await?;
        Ok(Response::new(pb::ListUsersResponse {
            users: page.users.iter().map(pb::User::from).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let current = ctx.principal.as_ref().map(|principal| principal.session_id);
        let sessions = self.bus.ask(&ctx, ListSessions).await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: sessions
                .iter()
                .map(|session| session_to_proto(session, current))
                .collect(),
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let page = self.bus.ask(&ctx, ListApiKeys::from(request.into_inner())).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: page.api_keys.iter().map(pb::ApiKey::from).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn get_jwks(&self, request: Request<pb::GetJwksRequest>) -> Result<Response<pb::GetJwksResponse>, Status> {
        let ctx = context(&request);
        checked(request.get_ref())?;
        let keys = self.bus.ask(&ctx, GetJwks).await?;
        Ok(Response::new(pb::GetJwksResponse {
            keys: keys.into_iter().map(pb::JsonWebKey::from).collect(),
        }))
    }
}
