//! `keel.api.v1.access` (proto/keel/api/v1/access.proto): which methods
//! need a signed-in caller, read from the descriptors; and
//! `keel.api.v1.idempotency`: which need an idempotency key.
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

/// Whether `method` declares `keel.api.v1.idempotency = IDEMPOTENCY_REQUIRED`.
pub fn requires_idempotency_key(method: &MethodDescriptor) -> bool {
    let Some(extension) = method.parent_pool().get_extension_by_name("keel.api.v1.idempotency") else {
        return false;
    };
    let options = method.options();
    options.has_extension(&extension) && matches!(options.get_extension(&extension).as_ref(), Value::EnumNumber(2))
}

fn grpc_path(method: &MethodDescriptor) -> String {
    format!("/{}/{}", method.parent_service().full_name(), method.name())
}

/// The gRPC paths (`/package.Service/Method`) of every method that needs a
/// caller, and of every method that needs an idempotency key.
#[derive(Debug, Clone, Default)]
pub struct AccessRules {
    needs_caller: HashSet<String>,
    needs_idempotency_key: HashSet<String>,
}

impl AccessRules {
    pub fn from_pool(pool: &DescriptorPool) -> AccessRules {
        let methods: Vec<MethodDescriptor> = pool
            .services()
            .flat_map(|service| service.methods().collect::<Vec<_>>())
            .collect();
        let needs_caller = methods
            .iter()
            .filter(|method| Access::of(method).needs_caller())
            .map(grpc_path)
            .collect();
        let needs_idempotency_key = methods
            .iter()
            .filter(|method| requires_idempotency_key(method))
            .map(grpc_path)
            .collect();
        AccessRules {
            needs_caller,
            needs_idempotency_key,
        }
    }

    /// Also requires an idempotency key on `grpc_path` (configuration can
    /// ask for it on methods whose contract does not).
    pub fn require_idempotency_key(&mut self, grpc_path: impl Into<String>) {
        self.needs_idempotency_key.insert(grpc_path.into());
    }

    /// Whether a call to `grpc_path` without an idempotency key is refused.
    pub fn needs_idempotency_key(&self, grpc_path: &str) -> bool {
        self.needs_idempotency_key.contains(grpc_path)
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
        // No keel method needs a key yet (the market's will).
        assert!(!rules.needs_idempotency_key("/keel.identity.v1.IdentityCommandService/CreateUser"));
    }

    /// `keel.api.v1.idempotency = IDEMPOTENCY_REQUIRED` is read from the
    /// descriptors (the test contract's CreateThing declares it).
    #[test]
    fn methods_that_require_an_idempotency_key_are_read_from_the_descriptors() {
        let descriptors = include_bytes!(concat!(env!("OUT_DIR"), "/testing_descriptor.bin"));
        let mut rules = AccessRules::from_descriptor_set(descriptors).unwrap();
        assert!(rules.needs_idempotency_key("/keel.testing.v1.TranscodeTestService/CreateThing"));
        assert!(!rules.needs_idempotency_key("/keel.testing.v1.TranscodeTestService/Echo"));
        rules.require_idempotency_key("/keel.testing.v1.TranscodeTestService/Echo");
        assert!(rules.needs_idempotency_key("/keel.testing.v1.TranscodeTestService/Echo"));
    }
}
