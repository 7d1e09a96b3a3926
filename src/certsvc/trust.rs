//! The Tax Administration's chains this module needs, behind one seam: `crate::vero_ca` (being
//! built on another branch) will provide them; until it lands these stand-ins keep the product
//! honest (no embedded signer roots: `--service-signer-ca` is required; leaf-only chains).

use rustls::pki_types::CertificateDer;

use crate::vero_ca::Environment;

/// Roots and issuing CAs that the certificate service's response signatures chain to.
pub fn service_signers(_env: Environment) -> Vec<CertificateDer<'static>> {
    Vec::new()
}

/// The leaf followed by its issuing and intermediate CAs, as `cert.pem` should hold them.
pub fn complete_chain(leaf: &CertificateDer<'_>) -> Vec<CertificateDer<'static>> {
    vec![leaf.clone().into_owned()]
}
