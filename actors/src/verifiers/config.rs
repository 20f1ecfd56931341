//! The verifier config: one TOML file (or a `[verifiers]` table of the run config).
//!
//! ```toml
//! timeout_secs = 60      # per verification, any verifier
//! parallel = 4           # verifications at once in a batch
//!
//! [math]               # each built-in verifier has its section, all optional
//! [code]
//! timeout_secs = 6
//! all_or_nothing = false
//!
//! [[plugins]]
//! name = "my_checker"    # dataset lines with "verifier": "my_checker" go here
//! command = "python3"
//! args = ["examples/plugin_verifier.py"]
//! timeout_secs = 10
//! ```

use std::path::Path;

use serde::Deserialize;

use super::choice::ChoiceConfig;
use super::code::CodeConfig;
use super::format::FormatConfig;
use super::grounding::GroundingConfig;
use super::math::MathConfig;
use super::plugin::PluginConfig;
use crate::{Error, Result};

/// Names the built-in verifiers take; plugins may not reuse them.
pub const BUILTIN_VERIFIERS: [&str; 5] = ["math", "choice", "code", "format", "grounding"];

/// Every verifier's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifiersConfig {
    /// Seconds one verification may take (any verifier) before it scores 0 as timed out. Generous: the code
    /// verifier and plugins have their own, finer limits inside.
    pub timeout_secs: f64,
    /// Verifications run at once by a batch (threads). The code verifier multiplies this by its
    /// `parallel_tests`, so keep the product near the core count.
    pub parallel: usize,
    /// The math verifier (`"verifier": "math"`).
    pub math: MathConfig,
    /// The multiple-choice verifier (`"verifier": "choice"`).
    pub choice: ChoiceConfig,
    /// The format verifier (`"verifier": "format"`).
    pub format: FormatConfig,
    /// The code verifier (`"verifier": "code"`).
    pub code: CodeConfig,
    /// The grounding (CHAIR) verifier (`"verifier": "grounding"`, and the monitor's probes): extra object
    /// and attribute words.
    pub grounding: GroundingConfig,
    /// External-process verifiers, one `[[plugins]]` entry each.
    pub plugins: Vec<PluginConfig>,
}

impl Default for VerifiersConfig {
    fn default() -> Self {
        VerifiersConfig {
            timeout_secs: 60.0,
            parallel: std::thread::available_parallelism().map_or(2, |n| n.get()),
            math: MathConfig::default(),
            choice: ChoiceConfig::default(),
            format: FormatConfig::default(),
            code: CodeConfig::default(),
            grounding: GroundingConfig::default(),
            plugins: Vec::new(),
        }
    }
}

impl VerifiersConfig {
    /// Parse TOML text and validate it; errors name the key (and, for syntax, the line).
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let config: VerifiersConfig = toml::from_str(text).map_err(|error| Error::Config {
            key: "verifiers".into(),
            msg: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Read, parse and validate a TOML file; errors name the file and the key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text)
            .map_err(|error| Error::Msg(format!("{}: {error}", path.display())))
    }

    /// Check the values once, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        if !(self.timeout_secs.is_finite() && self.timeout_secs > 0.0) {
            return Err(Error::Config {
                key: "timeout_secs".into(),
                msg: "must be a positive number of seconds".into(),
            });
        }
        if self.parallel == 0 {
            return Err(Error::Config {
                key: "parallel".into(),
                msg: "must be at least 1".into(),
            });
        }
        self.code.validate()?;
        if self.code.budget_secs + self.code.timeout_secs >= self.timeout_secs {
            return Err(Error::Config {
                key: "code.budget_secs".into(),
                msg: format!(
                    "budget_secs + timeout_secs of [code] ({} s) must stay under the top-level timeout_secs ({} s), \
                     or long test suites would be abandoned whole",
                    self.code.budget_secs + self.code.timeout_secs,
                    self.timeout_secs
                ),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for (index, plugin) in self.plugins.iter().enumerate() {
            let key = format!("plugins[{index}]");
            plugin.validate(&key)?;
            if BUILTIN_VERIFIERS.contains(&plugin.name.as_str()) {
                return Err(Error::Config {
                    key: format!("{key}.name"),
                    msg: format!("`{}` is a built-in verifier's name", plugin.name),
                });
            }
            if !seen.insert(plugin.name.as_str()) {
                return Err(Error::Config {
                    key: format!("{key}.name"),
                    msg: format!("`{}` is used twice", plugin.name),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let config = VerifiersConfig::from_toml_str(
            r#"
            timeout_secs = 50
            parallel = 3
            [math]
            symbolic = false
            [code]
            all_or_nothing = true
            network = "allow"
            [[plugins]]
            name = "judge"
            command = "python3"
            args = ["judge.py"]
            timeout_secs = 2.5
            "#,
        )
        .unwrap();
        assert_eq!(config.parallel, 3);
        assert!(config.code.all_or_nothing);
        assert!(!config.math.symbolic);
        assert_eq!(config.plugins[0].args, vec!["judge.py".to_string()]);
        assert_eq!(config.plugins[0].processes, 1);
    }

    #[test]
    fn errors_name_the_key() {
        let unknown = VerifiersConfig::from_toml_str("[code]\ntimeout = 3\n")
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `timeout`"), "{unknown}");
        let budget = VerifiersConfig::from_toml_str("timeout_secs = 30\n")
            .unwrap_err()
            .to_string();
        assert!(budget.contains("code.budget_secs"), "{budget}");
        let math = VerifiersConfig::from_toml_str("[math]\nsymbolik = true\n")
            .unwrap_err()
            .to_string();
        assert!(math.contains("unknown field `symbolik`"), "{math}");
        let zero = VerifiersConfig::from_toml_str("[code]\nparallel_tests = 0\n")
            .unwrap_err()
            .to_string();
        assert!(zero.contains("code.parallel_tests"), "{zero}");
        let plugin = "[[plugins]]\nname = \"p\"\ncommand = \"x\"\n[[plugins]]\nname = \"math\"\ncommand = \"y\"\n";
        let clash = VerifiersConfig::from_toml_str(plugin)
            .unwrap_err()
            .to_string();
        assert!(clash.contains("plugins[1].name"), "{clash}");
        let missing = VerifiersConfig::from_toml_str("[[plugins]]\nname = \"p\"\n")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing field `command`"), "{missing}");
    }
}
