//! Who is calling: shared access policies, symmetric keys and SAS tokens.
//!
//! Every front end authenticates the same way (`shared/protocol.md` B): parse the token, find the
//! key it claims (a policy's when `skn` is present, else the device's or module's), check the
//! HMAC over `sr` exactly as written, the expiry, the host and the resource scope, then the
//! permissions the operation needs.

pub mod key;
pub mod sas;

pub use key::SymmetricKey;
pub use sas::SasToken;

use serde::{Deserialize, Serialize};

/// One permission of a shared access policy, as IoT Hub names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Permission {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    DeviceConnect,
}

/// A set of [`Permission`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Permissions(u8);

impl Permissions {
    pub fn of(list: &[Permission]) -> Self {
        Self(list.iter().fold(0, |acc, p| acc | Self::bit(*p)))
    }

    fn bit(p: Permission) -> u8 {
        match p {
            Permission::RegistryRead => 1,
            Permission::RegistryWrite => 2,
            Permission::ServiceConnect => 4,
            Permission::DeviceConnect => 8,
        }
    }

    pub fn has(self, p: Permission) -> bool {
        self.0 & Self::bit(p) != 0
    }

    /// Whether the set holds at least one of `any`.
    pub fn has_any(self, any: &[Permission]) -> bool {
        any.iter().any(|p| self.has(*p))
    }
}

/// A shared access policy of the hub: a name, its keys and what it may do.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub primary_key: SymmetricKey,
    pub secondary_key: SymmetricKey,
    pub permissions: Permissions,
}

/// The well-known key of the emulator's `iothubowner` policy. Insecure by design: it is published
/// in the README so that tests and samples can use a fixed connection string, like Azurite's
/// `devstoreaccount1` key. Never use it for anything but the emulator.
pub const OWNER_KEY: &str = "PCFd5Ixr95rqeCXdxUvRnBzqmtWpxg9nDnvYeGICeug=";

/// The built-in policies, with fixed, published keys (see the README).
pub fn default_policies() -> Vec<Policy> {
    use Permission::*;
    let table: [(&str, &str, &str, &[Permission]); 5] = [
        (
            "iothubowner",
            OWNER_KEY,
            "Wm0w3t7lNF4o0iGOXqoHwA4MZ6jzKn7N5sQ2bHrW9CI=",
            &[RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect],
        ),
        (
            "service",
            "c2VydmljZS1lbXVsYXRvci1rZXktZG8tbm90LXVzZSE=",
            "c2VydmljZS1lbXVsYXRvci1rZXktc2Vjb25kYXJ5ISE=",
            &[ServiceConnect],
        ),
        (
            "device",
            "ZGV2aWNlLWVtdWxhdG9yLWtleS1kby1ub3QtdXNlISE=",
            "ZGV2aWNlLWVtdWxhdG9yLWtleS1zZWNvbmRhcnkhISE=",
            &[DeviceConnect],
        ),
        (
            "registryRead",
            "cmVnaXN0cnlSZWFkLWVtdWxhdG9yLWtleS1ubyB1c2U=",
            "cmVnaXN0cnlSZWFkLWVtdWxhdG9yLWtleS0yIG5vdXM=",
            &[RegistryRead],
        ),
        (
            "registryReadWrite",
            "cmVnaXN0cnlSVy1lbXVsYXRvci1rZXktZG8tbm90LXU=",
            "cmVnaXN0cnlSVy1lbXVsYXRvci1rZXktMi1kby1ub3Q=",
            &[RegistryRead, RegistryWrite],
        ),
    ];
    table
        .into_iter()
        .map(|(name, primary, secondary, perms)| Policy {
            name: name.to_owned(),
            primary_key: SymmetricKey::parse(primary).expect("built-in key is valid base64"),
            secondary_key: SymmetricKey::parse(secondary).expect("built-in key is valid base64"),
            permissions: Permissions::of(perms),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_policies_parse_and_owner_has_every_permission() {
        let policies = default_policies();
        let owner = policies.iter().find(|p| p.name == "iothubowner").unwrap();
        assert_eq!(owner.primary_key.to_base64(), OWNER_KEY);
        for p in [
            Permission::RegistryRead,
            Permission::RegistryWrite,
            Permission::ServiceConnect,
            Permission::DeviceConnect,
        ] {
            assert!(owner.permissions.has(p));
        }
        let read = policies.iter().find(|p| p.name == "registryRead").unwrap();
        assert!(!read.permissions.has(Permission::RegistryWrite));
    }
}
