//! `keel.api.v1.access` (proto/keel/api/v1/access.proto): which methods
//! need a signed-in caller, read from the descriptors.
//!
//! The server's request layer refuses an anonymous call to such a method
//! with UNAUTHENTICATED before the method reads its request; the REST edge
//! does the same before it reads a body, so an anonymous caller learns
//! nothing about a method's field rules. What a signed-in caller may do
//! (an admin method's PERMISSION_DENIED) stays with the handler.

use std::collections::HashSet;

use prost_reflect::{DescriptorPool, MethodDescriptor, Value};

/// The declared access of a method (`keel.api.v1.Access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Not declared: the handler alone decides.
    Unspecified,
    Public,
    User,
    Admin,
}

impl Access {
    /// What `method` declares.
    pub fn of(method: &MethodDescriptor) -> Access {
        let Some(extension) = method.parent_pool().get_extension_by_name("keel.api.v1.access") else {
            return Access::Unspecified;
        };
        let options = method.options();
        if !options.has_extension(&extension) {
            return Access::Unspecified;
        }
        match options.get_extension(&extension).as_ref() {
            Value::EnumNumber(1) => Access::Public,
            Value::EnumNumber(2) => Access::User,
            Value::EnumNumber(3) => Access::Admin,
            _ => Access::Unspecified,
        }
    }

    pub fn needs_caller(self) -> bool {
        matches!(self, Access::User | Access::Admin)
    }
}

/// The gRPC paths (`/package.Service/Method`) of every method that needs a caller.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    needs_caller: HashSet<String>,
}

impl AccessRules {
    pub fn from_pool(pool: &DescriptorPool) -> AccessRules {
        let needs_caller = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .filter(|method| Access::of(method).needs_caller())
            .map(|method| format!("/{}/{}", method.parent_service().full_name(), method.name()))
            .collect();
        AccessRules { needs_caller }
    }

    pub fn from_descriptor_set(descriptor_set: &[u8]) -> Result<AccessRules, String> {
        let pool = DescriptorPool::decode(descriptor_set).map_err(|error| format!("descriptor set: {error}"))?;
        Ok(AccessRules::from_pool(&pool))
    }

    /// Whether an anonymous call to `grpc_path` is refused.
    pub fn needs_caller(&self, grpc_path: &str) -> bool {
        self.needs_caller.contains(grpc_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every keel method says who may call it: a forgotten option would
    /// leave an anonymous caller to the handler's own checks.
    #[test]
    fn every_keel_method_declares_its_access() {
        let pool = DescriptorPool::decode(keel_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut methods = 0;
        for service in pool
            .services()
            .filter(|service| service.full_name().starts_with("keel."))
        {
            for method in service.methods() {
                assert_ne!(Access::of(&method), Access::Unspecified, "{}", method.full_name());
                methods += 1;
            }
        }
        assert!(methods > 10, "{methods}");
        let rules = AccessRules::from_pool(&pool);
        assert!(rules.needs_caller("/keel.identity.v1.IdentityCommandService/CreateUser"));
        assert!(rules.needs_caller("/keel.identity.v1.IdentityQueryService/GetCurrentUser"));
        assert!(!rules.needs_caller("/keel.identity.v1.IdentityCommandService/Login"));
        assert!(!rules.needs_caller("/grpc.health.v1.Health/Check"));
    }
}
