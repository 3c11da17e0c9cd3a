//! Test certificates made with the openssl command line tool: a CA, and server certificates
//! it signs (keys readable by the PostgreSQL server's user when the tests run as root).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// Runs `openssl` in `dir` and fails the test with its output if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl command line tool is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate and its private key.
pub struct KeyPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Makes a self-signed CA named `name` in `dir`.
pub fn make_ca(dir: &Path, name: &str) -> KeyPair {
    let (cert, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &format!("/CN=outbox-relay test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    KeyPair {
        cert: dir.join(cert),
        key: dir.join(key),
    }
}

/// Makes a server certificate for `subject_alt_name`, signed by `ca`, with a key PostgreSQL
/// accepts: owned by the server's OS user and readable by nobody else.
pub fn make_server_cert(
    dir: &Path,
    name: &str,
    ca: &KeyPair,
    serial: &str,
    subject_alt_name: &str,
) -> KeyPair {
    let (cert, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    std::fs::write(
        dir.join(&ext),
        format!(
            "subjectAltName = {subject_alt_name}\nbasicConstraints = critical,CA:FALSE\n\
             keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca.cert.to_str().unwrap(),
            "-CAkey",
            ca.key.to_str().unwrap(),
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
    let key = dir.join(key);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    if running_as_root() {
        let out = Command::new("chown")
            .arg("postgres:")
            .arg(&key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chown failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    KeyPair {
        cert: dir.join(cert),
        key,
    }
}
