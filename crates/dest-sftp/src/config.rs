//! The `[destinations.config]` table of an SFTP destination, validated into
//! typed [`Settings`] with every problem reported at once (for `check-config`).

use std::path::PathBuf;
use std::time::Duration;

use batchrouter_core::{ConfigProblems, ConfigReader, Secret};
use serde_json::Value;

use crate::hostkey::Fingerprint;
use crate::key;
use crate::path::PathTemplate;

/// Every key accepted under `[destinations.config]`.
pub const CONFIG_KEYS: &[&str] = &[
    "host",
    "port",
    "username",
    "authMethod",
    "privateKey",
    "privateKeyPath",
    "privateKeyPassphrase",
    "password",
    "fileFormat",
    "filePath",
    "sortColumnNames",
    "columnOrder",
    "knownHosts",
    "hostKeyFingerprint",
    "insecureSkipHostKeyCheck",
    "connectTimeout",
    "ioTimeout",
];

/// SSH's well-known port, used when `port` is absent.
pub const DEFAULT_PORT: u16 = 22;
/// Bound on establishing the TCP connection when `connectTimeout` is absent.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every single SSH/SFTP exchange when `ioTimeout` is absent.
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The config table as read: every key through the shared reader, so each
/// type problem is recorded (named by its key) and checking goes on.
struct RawConfig {
    host: Option<String>,
    port: u16,
    username: Option<String>,
    auth_method: Option<String>,
    private_key: Option<Secret>,
    private_key_path: Option<String>,
    private_key_passphrase: Option<Secret>,
    password: Option<Secret>,
    file_format: Option<String>,
    file_path: Option<String>,
    sort_column_names: bool,
    column_order: Option<Vec<String>>,
    known_hosts: Option<String>,
    host_key_fingerprint: Option<String>,
    insecure_skip_host_key_check: bool,
    connect_timeout: Duration,
    io_timeout: Duration,
}

impl RawConfig {
    fn read(r: &mut ConfigReader) -> RawConfig {
        RawConfig {
            host: r.string("host"),
            port: r.count("port", 1, 65535).map_or(DEFAULT_PORT, |p| p as u16),
            username: r.string("username"),
            auth_method: r.string("authMethod"),
            private_key: r.secret("privateKey"),
            private_key_path: r.string("privateKeyPath"),
            private_key_passphrase: r.secret("privateKeyPassphrase"),
            password: r.secret("password"),
            file_format: r.string("fileFormat"),
            file_path: r.string("filePath"),
            sort_column_names: r.bool("sortColumnNames").unwrap_or(false),
            column_order: r.value("columnOrder"),
            known_hosts: r.string("knownHosts"),
            host_key_fingerprint: r.string("hostKeyFingerprint"),
            insecure_skip_host_key_check: r.bool("insecureSkipHostKeyCheck").unwrap_or(false),
            connect_timeout: r
                .timeout("connectTimeout")
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            io_timeout: r.timeout("ioTimeout").unwrap_or(DEFAULT_IO_TIMEOUT),
        }
    }
}

/// Validated settings of one SFTP destination.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Server name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Login name.
    pub username: String,
    /// How to authenticate.
    pub auth: Auth,
    /// Content format of the uploaded files.
    pub format: FileFormat,
    /// Remote file name template.
    pub path: PathTemplate,
    /// Columns that lead the CSV header, in this order (`columnOrder`).
    pub column_order: Vec<String>,
    /// Sort the remaining CSV columns by name (`sortColumnNames`).
    pub sort_column_names: bool,
    /// How the server's host key is verified.
    pub host_key: HostKeyPolicy,
    /// Bound on the TCP connect.
    pub connect_timeout: Duration,
    /// Bound on every SSH exchange (handshake, each write acknowledgement, …).
    pub io_timeout: Duration,
}

/// Credentials for the SSH login.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Public-key authentication (`authMethod = "keyAuth"`).
    Key {
        /// Where the private key comes from.
        key: KeySource,
        /// Passphrase of an encrypted key.
        passphrase: Option<Secret>,
    },
    /// Password authentication (`authMethod = "passwordAuth"`).
    Password(Secret),
}

/// Where a private key comes from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// PEM or OpenSSH text given in the config (`privateKey`).
    Inline(Secret),
    /// A file read at each connect, so a rotated key is picked up (`privateKeyPath`).
    File(PathBuf),
}

/// The uploaded file's content format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// RFC 4180 CSV with a header row (`csv`).
    Csv,
    /// One JSON record a line (`json`, NDJSON).
    Json,
    /// One JSON array holding every record (`jsonArray`).
    JsonArray,
}

impl FileFormat {
    /// The config word for this format.
    pub fn as_str(self) -> &'static str {
        match self {
            FileFormat::Csv => "csv",
            FileFormat::Json => "json",
            FileFormat::JsonArray => "jsonArray",
        }
    }
}

/// How the server's identity is checked before any credential is sent.
#[derive(Clone, Debug)]
pub enum HostKeyPolicy {
    /// Look the key up in an OpenSSH `known_hosts` file (`knownHosts`).
    KnownHosts(PathBuf),
    /// Compare the key's SHA-256 fingerprint (`hostKeyFingerprint`).
    Fingerprint(Fingerprint),
    /// No check at all (`insecureSkipHostKeyCheck = true`).
    Insecure,
}

impl Settings {
    /// Parses and validates a config table, listing every problem found.
    pub fn from_config(config: &Value) -> Result<Settings, ConfigProblems> {
        // The shared reader reports unknown keys (with did-you-mean) and
        // every per-key problem, so all are listed at once.
        let mut reader = ConfigReader::new(config, CONFIG_KEYS);
        let raw = RawConfig::read(&mut reader);
        let problems = reader.problems_mut();
        let auth = auth(&raw, problems);

        let host = non_empty(raw.host);
        match &host {
            None => problems.push("`host` is required"),
            Some(h) => check_host(h, problems),
        }
        let port = raw.port;
        let username = non_empty(raw.username);
        if username.is_none() {
            problems.push("`username` is required");
        }

        let format = match non_empty(raw.file_format).as_deref() {
            None => {
                problems.push("`fileFormat` is required (csv, json or jsonArray)");
                None
            }
            Some("csv") => Some(FileFormat::Csv),
            Some("json") | Some("ndjson") => Some(FileFormat::Json),
            Some("jsonArray") => Some(FileFormat::JsonArray),
            Some(other) => {
                problems.push(format!(
                    "`fileFormat` = `{other}` is not supported (use csv, json or jsonArray)"
                ));
                None
            }
        };

        let path = match non_empty(raw.file_path) {
            None => {
                problems
                    .push("`filePath` is required (e.g. `exports/{YYYY}-{MM}-{DD}/{batchID}.csv`)");
                None
            }
            Some(t) => match PathTemplate::parse(&t) {
                Ok(p) => Some(p),
                Err(list) => {
                    for p in list {
                        problems.push(p);
                    }
                    None
                }
            },
        };

        let column_order = raw.column_order.unwrap_or_default();
        check_column_order(&column_order, problems);
        let sort_column_names = raw.sort_column_names;
        let host_key = host_key_policy(
            non_empty(raw.known_hosts),
            non_empty(raw.host_key_fingerprint),
            raw.insecure_skip_host_key_check,
            problems,
        );

        let (connect_timeout, io_timeout) = (raw.connect_timeout, raw.io_timeout);

        reader.finish()?;
        // Every `None` above pushed a problem, so these are all present here.
        match (host, username, auth, format, path, host_key) {
            (Some(host), Some(username), Some(auth), Some(format), Some(path), Some(host_key)) => {
                Ok(Settings {
                    host,
                    port,
                    username,
                    auth,
                    format,
                    path,
                    column_order,
                    sort_column_names,
                    host_key,
                    connect_timeout,
                    io_timeout,
                })
            }
            _ => Err(ConfigProblems::one("incomplete SFTP config")),
        }
    }

    /// `host:port` for messages (IPv6 in brackets).
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn non_empty(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn check_host(host: &str, problems: &mut ConfigProblems) {
    if host.contains("://") {
        problems.push(format!(
            "`host` must be a name or address, not a URL (`{host}`)"
        ));
    } else if host
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '@')
    {
        problems.push(format!(
            "`host` = `{host}` is not a valid host name or address"
        ));
    } else if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        problems.push(format!(
            "`host` = `{host}` holds a port: put the port in `port` and only the name in `host`"
        ));
    }
}

fn check_column_order(columns: &[String], problems: &mut ConfigProblems) {
    let mut seen = std::collections::HashSet::new();
    for c in columns {
        if c.is_empty() {
            problems.push("`columnOrder` holds an empty column name");
        } else if !seen.insert(c.as_str()) {
            problems.push(format!("`columnOrder` names `{c}` twice"));
        }
    }
}

fn auth(raw: &RawConfig, problems: &mut ConfigProblems) -> Option<Auth> {
    let key = raw.private_key.clone();
    let key_path = raw
        .private_key_path
        .clone()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let passphrase = raw.private_key_passphrase.clone();
    let password = raw.password.clone();

    match raw.auth_method.as_deref().map(str::trim) {
        None | Some("") => {
            problems.push("`authMethod` is required (keyAuth or passwordAuth)");
            None
        }
        Some("keyAuth") => {
            if password.is_some() {
                problems
                    .push("`password` is only used with authMethod = \"passwordAuth\"; remove it");
            }
            let source = match (key, key_path) {
                (Some(_), Some(_)) => {
                    problems.push("set either `privateKey` or `privateKeyPath`, not both");
                    return None;
                }
                (None, None) => {
                    problems.push("authMethod = \"keyAuth\" needs `privateKey` (the key text) or `privateKeyPath`");
                    return None;
                }
                (Some(text), None) => KeySource::Inline(Secret::new(key::check_inline_key(
                    text.expose(),
                    passphrase.is_some(),
                    problems,
                ))),
                (None, Some(path)) => {
                    let path = PathBuf::from(path);
                    key::check_key_file(&path, passphrase.is_some(), problems);
                    KeySource::File(path)
                }
            };
            Some(Auth::Key {
                key: source,
                passphrase,
            })
        }
        Some("passwordAuth") => {
            if key.is_some() || key_path.is_some() {
                problems.push("`privateKey`/`privateKeyPath` are only used with authMethod = \"keyAuth\"; remove them");
            }
            if passphrase.is_some() {
                problems.push(
                    "`privateKeyPassphrase` is only used with authMethod = \"keyAuth\"; remove it",
                );
            }
            match password {
                Some(p) => Some(Auth::Password(p)),
                None => {
                    problems.push("authMethod = \"passwordAuth\" needs `password`");
                    None
                }
            }
        }
        Some(other) => {
            let hint =
                batchrouter_core::destination::did_you_mean(other, &["keyAuth", "passwordAuth"])
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
            problems.push(format!(
                "`authMethod` = `{other}` is not supported{hint}; use keyAuth or passwordAuth"
            ));
            None
        }
    }
}

fn host_key_policy(
    known_hosts: Option<String>,
    fingerprint: Option<String>,
    insecure: bool,
    problems: &mut ConfigProblems,
) -> Option<HostKeyPolicy> {
    match (known_hosts, fingerprint, insecure) {
        (None, None, false) => {
            problems.push(
                "the server's host key must be verified: set `knownHosts` (an OpenSSH known_hosts file) or \
                 `hostKeyFingerprint` (\"SHA256:…\" as `ssh-keygen -lf` prints it); \
                 `insecureSkipHostKeyCheck = true` skips the check",
            );
            None
        }
        (Some(_), Some(_), _) => {
            problems.push("set either `knownHosts` or `hostKeyFingerprint`, not both");
            None
        }
        (Some(_), None, true) | (None, Some(_), true) => {
            problems.push("`insecureSkipHostKeyCheck = true` contradicts `knownHosts`/`hostKeyFingerprint`; remove one");
            None
        }
        (None, None, true) => Some(HostKeyPolicy::Insecure),
        (Some(path), None, false) => {
            let path = PathBuf::from(path);
            match crate::hostkey::load_known_hosts(&path) {
                Ok(0) => {
                    problems.push(format!(
                        "`knownHosts` {} holds no host keys",
                        path.display()
                    ));
                    None
                }
                Ok(_) => Some(HostKeyPolicy::KnownHosts(path)),
                Err(e) => {
                    problems.push(format!("`knownHosts` {}: {e}", path.display()));
                    None
                }
            }
        }
        (None, Some(text), false) => match Fingerprint::parse(&text) {
            Ok(f) => Some(HostKeyPolicy::Fingerprint(f)),
            Err(e) => {
                problems.push(format!("`hostKeyFingerprint`: {e}"));
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::tests::openssh_key;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "host": "sftp.example.com",
            "username": "drop",
            "authMethod": "passwordAuth",
            "password": "pw",
            "fileFormat": "csv",
            "filePath": "exports/{YYYY}/{batchID}.csv",
            "hostKeyFingerprint": "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
        })
    }

    #[test]
    fn minimal_password_config_parses_with_defaults() {
        let s = Settings::from_config(&base()).unwrap();
        assert_eq!(s.port, 22);
        assert_eq!(s.format, FileFormat::Csv);
        assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(s.io_timeout, DEFAULT_IO_TIMEOUT);
        assert!(matches!(s.auth, Auth::Password(ref p) if p.expose() == "pw"));
        assert!(matches!(s.host_key, HostKeyPolicy::Fingerprint(_)));
        assert!(
            !format!("{s:?}").contains("\"pw\""),
            "secret leaked in Debug"
        );
    }

    #[test]
    fn ports_and_timeouts_accept_numbers_and_strings() {
        let mut c = base();
        c["port"] = json!("2222");
        c["connectTimeout"] = json!("1500ms");
        c["ioTimeout"] = json!(5);
        c["sortColumnNames"] = json!("true");
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.port, 2222);
        assert_eq!(s.connect_timeout, Duration::from_millis(1500));
        assert_eq!(s.io_timeout, Duration::from_secs(5));
        assert!(s.sort_column_names);
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let c = json!({
            "host": "sftp://x",
            "port": 70000,
            "authMethod": "keyAuht",
            "fileFormat": "xml",
            "filePath": "a/{YYY}/{batchID",
            "connectTimeout": "soon",
            "ioTimeout": "10ms",
            "sortColumnNames": "maybe",
            "columnOrder": ["a", "a"],
        });
        let err = Settings::from_config(&c).unwrap_err().0;
        let all = err.join("\n");
        for needle in [
            "`host` must be a name or address, not a URL",
            "`port` = 70000 is more than the 65535 allowed",
            "`username` is required",
            "did you mean `keyAuth`",
            "`fileFormat` = `xml` is not supported",
            "unknown macro `{YYY}`",
            "did you mean `{YYYY}`",
            "unclosed `{`",
            "`connectTimeout`",
            "`ioTimeout` = 10ms is shorter than the 100ms allowed",
            "`sortColumnNames` must be true or false",
            "`columnOrder` names `a` twice",
            "host key must be verified",
        ] {
            assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
        }
    }

    #[test]
    fn unknown_keys_get_suggestions() {
        let mut c = base();
        c["hostKeyFingerprnt"] = json!("x");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err[0].contains("did you mean `hostKeyFingerprint`"),
            "{err:?}"
        );
    }

    #[test]
    fn key_auth_checks_the_key_text() {
        let mut c = base();
        c["authMethod"] = json!("keyAuth");
        c.as_object_mut().unwrap().remove("password");
        c["privateKey"] = json!("ssh-ed25519 AAAAC3Nza user@host");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter().any(|e| e.contains("holds a public key")),
            "{err:?}"
        );

        c["privateKey"] = json!("hello");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter()
                .any(|e| e.contains("is not a PEM or OpenSSH private key")),
            "{err:?}"
        );

        // A key pasted through an environment variable with `\n` escapes.
        c["privateKey"] = json!(openssh_key("none").replace('\n', "\\n"));
        let s = Settings::from_config(&c).unwrap();
        match s.auth {
            Auth::Key {
                key: KeySource::Inline(k),
                passphrase: None,
            } => {
                assert!(k
                    .expose()
                    .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl"));
            }
            other => panic!("{other:?}"),
        }

        c["password"] = json!("pw");
        c["privateKeyPath"] = json!("/nonexistent/key");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter()
                .any(|e| e.contains("`password` is only used with")),
            "{err:?}"
        );
        assert!(err.iter().any(|e| e.contains("not both")), "{err:?}");
    }

    #[test]
    fn key_files_must_exist_and_encrypted_keys_need_a_passphrase() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = base();
        c["authMethod"] = json!("keyAuth");
        c.as_object_mut().unwrap().remove("password");
        c["privateKeyPath"] = json!(dir.path().join("missing").to_str().unwrap());
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(err.iter().any(|e| e.contains("cannot be read")), "{err:?}");

        let pem = dir.path().join("enc.pem");
        std::fs::write(
            &pem,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        c["privateKeyPath"] = json!(pem.to_str().unwrap());
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter()
                .any(|e| e.contains("is encrypted: set `privateKeyPassphrase`")),
            "{err:?}"
        );
        c["privateKeyPassphrase"] = json!("secret");
        let s = Settings::from_config(&c).unwrap();
        assert!(matches!(
            s.auth,
            Auth::Key {
                key: KeySource::File(_),
                passphrase: Some(_)
            }
        ));
    }

    #[test]
    fn host_key_policies_are_exclusive() {
        let mut c = base();
        c["insecureSkipHostKeyCheck"] = json!(true);
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(err.iter().any(|e| e.contains("contradicts")), "{err:?}");

        c.as_object_mut().unwrap().remove("hostKeyFingerprint");
        let s = Settings::from_config(&c).unwrap();
        assert!(matches!(s.host_key, HostKeyPolicy::Insecure));

        c["insecureSkipHostKeyCheck"] = json!(false);
        c["hostKeyFingerprint"] = json!("MD5:aa:bb");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter().any(|e| e.contains("`hostKeyFingerprint`")),
            "{err:?}"
        );

        c.as_object_mut().unwrap().remove("hostKeyFingerprint");
        c["knownHosts"] = json!("/nonexistent/known_hosts");
        let err = Settings::from_config(&c).unwrap_err().0;
        assert!(
            err.iter()
                .any(|e| e.contains("`knownHosts` /nonexistent/known_hosts")),
            "{err:?}"
        );
    }

    #[test]
    fn hosts_with_ports_or_spaces_are_rejected() {
        for (host, needle) in [
            ("a.example:22", "holds a port"),
            ("a b", "not a valid host"),
            ("::1", ""),
        ] {
            let mut c = base();
            c["host"] = json!(host);
            let r = Settings::from_config(&c);
            if needle.is_empty() {
                assert_eq!(r.unwrap().address(), "[::1]:22");
            } else {
                let err = r.unwrap_err().0;
                assert!(err.iter().any(|e| e.contains(needle)), "{host}: {err:?}");
            }
        }
    }
}
