//! One TOML config file for every service, layered under environment variables and flags.
//!
//! Every flag of every service already has an environment variable (clap `env`). A config file
//! is applied by turning each `[section] key = value` into the variable `SECTION_KEY` (upper
//! case, `-` as `_`) when that variable is not already set, before the flags are parsed. So the
//! precedence is: flag > environment > file > built-in default, and the file's keys are exactly
//! the documented environment variables:
//!
//! ```toml
//! [nats]
//! url = "nats://10.0.0.1:4222,nats://10.0.0.2:4222"   # NATS_URL
//! [gateway]
//! listen = "0.0.0.0:8080"                            # GATEWAY_LISTEN
//! heartbeat_timeout_secs = 30                         # GATEWAY_HEARTBEAT_TIMEOUT_SECS
//! ```
//!
//! The file is named by `--config PATH` or the `CHAT_CONFIG` variable.

use anyhow::{bail, Context as _};

/// Reads the config file named on the command line or in `CHAT_CONFIG`, if any, and exports its
/// settings as environment variables that are not set yet. Call before parsing flags, while the
/// process is still single-threaded.
pub fn apply_config_file() -> anyhow::Result<()> {
    let path = config_path(std::env::args()).or_else(|| std::env::var("CHAT_CONFIG").ok());
    let Some(path) = path else { return Ok(()) };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading config file {path}"))?;
    for (var, value) in env_pairs(&text).with_context(|| format!("in config file {path}"))? {
        if std::env::var_os(&var).is_none() {
            // SAFETY: called at start-up before any other thread exists.
            unsafe { std::env::set_var(var, value) };
        }
    }
    Ok(())
}

fn config_path(mut args: impl Iterator<Item = String>) -> Option<String> {
    while let Some(a) = args.next() {
        if a == "--config" {
            return args.next();
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(p.to_owned());
        }
    }
    None
}

/// The environment variables a config file sets: `[section] key = value` → `SECTION_KEY`.
pub fn env_pairs(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut out = Vec::new();
    for (section, keys) in table {
        let Some(keys) = keys.as_table() else {
            bail!("`{section}` must be a [section] of keys");
        };
        for (key, value) in keys {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()))
                    .collect::<Vec<_>>()
                    .join(","),
                other => bail!("[{section}] {key}: unsupported value {other}"),
            };
            out.push((format!("{section}_{key}").to_uppercase().replace('-', "_"), value));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_become_variables() {
        let pairs = env_pairs(
            "[nats]\nurl = [\"nats://a:1\", \"nats://b:2\"]\n[gateway]\nlisten = \"0.0.0.0:80\"\nheartbeat-timeout-secs = 30\ndev_tokens = true\n",
        )
        .unwrap();
        assert!(pairs.contains(&("NATS_URL".into(), "nats://a:1,nats://b:2".into())));
        assert!(pairs.contains(&("GATEWAY_LISTEN".into(), "0.0.0.0:80".into())));
        assert!(pairs.contains(&("GATEWAY_HEARTBEAT_TIMEOUT_SECS".into(), "30".into())));
        assert!(pairs.contains(&("GATEWAY_DEV_TOKENS".into(), "true".into())));
    }

    #[test]
    fn refuses_bad_files() {
        assert!(env_pairs("listen = 1").is_err());
        assert!(env_pairs("[a\nb").is_err());
    }

    #[test]
    fn finds_the_path_flag() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>().into_iter();
        assert_eq!(config_path(args(&["x", "--config", "f.toml"])), Some("f.toml".into()));
        assert_eq!(config_path(args(&["x", "--config=g.toml"])), Some("g.toml".into()));
        assert_eq!(config_path(args(&["x"])), None);
    }
}
