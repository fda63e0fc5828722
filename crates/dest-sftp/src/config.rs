//! The `[destinations.config]` table of an SFTP destination, validated into
//! typed [`Settings`] with every problem reported at once (for `check-config`).

use std::path::PathBuf;
use std::time::Duration;

use batchrouter_core::lookup::parse_duration;
use batchrouter_core::{parse_destination_config, ConfigProblems, Secret};
use serde::Deserialize;
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
/// Longest accepted timeout, so a typo cannot park an upload for days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The config table as written; loosely typed so that validation can list
/// every problem instead of stopping at the first type error.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<Value>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    auth_method: Option<String>,
    #[serde(default)]
    private_key: Option<Secret>,
    #[serde(default)]
    private_key_path: Option<String>,
    #[serde(default)]
    private_key_passphrase: Option<Secret>,
    #[serde(default)]
    password: Option<Secret>,
    #[serde(default)]
    file_format: Option<String>,
    #[serde(default)]
    file_path: Option<String>,
    #[serde(default)]
    sort_column_names: Option<Value>,
    #[serde(default)]
    column_order: Option<Vec<String>>,
    #[serde(default)]
    known_hosts: Option<String>,
    #[serde(default)]
    host_key_fingerprint: Option<String>,
    #[serde(default)]
    insecure_skip_host_key_check: Option<Value>,
    #[serde(default)]
    connect_timeout: Option<Value>,
    #[serde(default)]
    io_timeout: Option<Value>,
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
        let raw: RawConfig = parse_destination_config(config, CONFIG_KEYS)?;
        let mut problems = ConfigProblems(Vec::new());
        let auth = auth(&raw, &mut problems);

        let host = non_empty(raw.host);
        match &host {
            None => problems.push("`host` is required"),
            Some(h) => check_host(h, &mut problems),
        }
        let port = port(raw.port.as_ref(), &mut problems);
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
        check_column_order(&column_order, &mut problems);
        let sort_column_names = flag(
            "sortColumnNames",
            raw.sort_column_names.as_ref(),
            &mut problems,
        );
        let insecure = flag(
            "insecureSkipHostKeyCheck",
            raw.insecure_skip_host_key_check.as_ref(),
            &mut problems,
        );
        let host_key = host_key_policy(
            non_empty(raw.known_hosts),
            non_empty(raw.host_key_fingerprint),
            insecure,
            &mut problems,
        );

        let connect_timeout = timeout(
            "connectTimeout",
            raw.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            &mut problems,
        );
        let io_timeout = timeout(
            "ioTimeout",
            raw.io_timeout.as_ref(),
            DEFAULT_IO_TIMEOUT,
            &mut problems,
        );

        problems.into_result()?;
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

fn non_empty_secret(v: Option<Secret>) -> Option<Secret> {
    v.filter(|s| !s.expose().trim().is_empty())
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

fn port(v: Option<&Value>, problems: &mut ConfigProblems) -> u16 {
    let n = match v {
        None | Some(Value::Null) => return DEFAULT_PORT,
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) if s.trim().is_empty() => return DEFAULT_PORT,
        Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
        Some(_) => None,
    };
    match n {
        Some(p @ 1..=65535) => p as u16,
        _ => {
            problems.push(format!(
                "`port` must be a number from 1 to 65535, not {}",
                v.map(Value::to_string).unwrap_or_default()
            ));
            DEFAULT_PORT
        }
    }
}

fn flag(key: &str, v: Option<&Value>, problems: &mut ConfigProblems) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => match s.trim().to_ascii_lowercase().as_str() {
            "true" => true,
            "false" | "" => false,
            _ => {
                problems.push(format!("`{key}` must be true or false, not `{s}`"));
                false
            }
        },
        Some(other) => {
            problems.push(format!("`{key}` must be true or false, not {other}"));
            false
        }
    }
}

fn timeout(
    key: &str,
    v: Option<&Value>,
    default: Duration,
    problems: &mut ConfigProblems,
) -> Duration {
    let parsed = match v {
        None | Some(Value::Null) => return default,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(secs) if secs.is_finite() && secs >= 0.0 && secs <= MAX_TIMEOUT.as_secs_f64() => {
                Ok(Duration::from_secs_f64(secs))
            }
            _ => Err(format!("`{n}` is not a number of seconds")),
        },
        Some(Value::String(s)) => parse_duration(s, Duration::from_secs(1)),
        Some(other) => Err(format!("{other} is not a duration")),
    };
    match parsed {
        Ok(d) if d < Duration::from_millis(100) => {
            problems.push(format!("`{key}` must be at least 100ms"));
            default
        }
        Ok(d) if d > MAX_TIMEOUT => {
            problems.push(format!("`{key}` must be at most 1h"));
            default
        }
        Ok(d) => d,
        Err(e) => {
            problems.push(format!(
                "`{key}`: {e} (e.g. \"10s\", \"500ms\" or a number of seconds)"
            ));
            default
        }
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
    let key = non_empty_secret(raw.private_key.clone());
    let key_path = raw
        .private_key_path
        .clone()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    let passphrase = non_empty_secret(raw.private_key_passphrase.clone());
    let password = non_empty_secret(raw.password.clone());

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
            "`port` must be a number from 1 to 65535",
            "`username` is required",
            "did you mean `keyAuth`",
            "`fileFormat` = `xml` is not supported",
            "unknown macro `{YYY}`",
            "did you mean `{YYYY}`",
            "unclosed `{`",
            "`connectTimeout`",
            "`ioTimeout` must be at least 100ms",
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
