//! The subject name every Flotilla certificate carries.

use rcgen::{DistinguishedName, DnType};

/// `O=Flotilla, CN=<common_name>`.
pub(crate) fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, common_name);
    dn
}
