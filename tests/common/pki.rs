//! A test PKI: one CA (rcgen) and the leaf certificates it signs, written as PEM files (keys
//! mode 600) in a temporary directory removed on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use switchyard::config::CertificateConfig;

/// A test CA and the files of the certificates it signs; removed on drop.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("switchyard-tls-{name}-{}", super::free_port()));
        std::fs::create_dir_all(&dir).expect("creating the PKI dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params
            .distinguished_name
            .push(DnType::CommonName, "switchyard test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("writing the CA");
        Pki { dir, ca, ca_file }
    }

    /// A leaf with common name `cn` valid for `names`, written as `<file>.pem` / `<file>.key`
    /// (the key mode 600, replaced atomically like a deploy tool does).
    pub fn leaf(&self, file: &str, cn: &str, names: &[&str]) -> CertificateConfig {
        self.write_leaf(file, cn, names, |_| {})
    }

    /// A leaf that expired in 2021.
    pub fn expired(&self, file: &str, cn: &str) -> CertificateConfig {
        self.write_leaf(file, cn, &["expired.test"], |params| {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        })
    }

    pub fn write_leaf(
        &self,
        file: &str,
        cn: &str,
        names: &[&str],
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> CertificateConfig {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        adjust(&mut params);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.ca).expect("signing a leaf");
        let config = self.paths(file);
        replace(&config.cert_file, cert.pem().as_bytes(), 0o644);
        replace(&config.key_file, key.serialize_pem().as_bytes(), 0o600);
        config
    }

    pub fn paths(&self, file: &str) -> CertificateConfig {
        CertificateConfig {
            cert_file: self.dir.join(format!("{file}.pem")),
            key_file: self.dir.join(format!("{file}.key")),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes `path` through a temporary file and a rename, so a reader never sees half a file.
pub fn replace(path: &Path, contents: &[u8], mode: u32) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).expect("writing a certificate file");
    std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&temporary, path).expect("renaming a certificate file");
}
