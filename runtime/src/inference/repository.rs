//! The model repository on disk, Triton-style:
//!
//! ```text
//! <root>/<model>/config.toml        partita's model config (see `partita_actors::model`)
//! <root>/<model>/<version>/model.pt TorchScript; the highest numeric version is served
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use partita_actors::model::{ModelConfig, ModelConfigError, ModelSpec};

/// One servable model: its validated spec and the file to load.
#[derive(Debug, Clone)]
pub struct RepoModel {
    pub spec: ModelSpec,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct ModelRepository {
    pub root: PathBuf,
    pub models: Vec<RepoModel>,
}

/// Every problem found in a repository, each with the path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoError {
    pub root: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for RepoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid model repository {}:", self.root.display())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RepoError {}

impl ModelRepository {
    /// Read and validate every model under `root`. Fails with every problem at once.
    pub fn load(root: &Path) -> Result<Self, RepoError> {
        let mut problems = Vec::new();
        let mut models = Vec::new();
        let fail = |problems: Vec<String>| RepoError { root: root.to_path_buf(), problems };
        let entries = match std::fs::read_dir(root) {
            Ok(e) => e,
            Err(e) => return Err(fail(vec![format!("cannot read directory: {e}")])),
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(['.', '_']))
            })
            .collect();
        dirs.sort();
        for dir in dirs {
            match load_model(&dir) {
                Ok(Some(m)) => models.push(m),
                Ok(None) => {} // not a model directory (no config.toml)
                Err(mut errs) => problems.append(&mut errs),
            }
        }
        if models.is_empty() && problems.is_empty() {
            problems
                .push("no models found (expected <model>/config.toml and <model>/<version>/model.pt)".into());
        }
        if problems.is_empty() { Ok(Self { root: root.to_path_buf(), models }) } else { Err(fail(problems)) }
    }

    pub fn specs(&self) -> Vec<ModelSpec> {
        self.models.iter().map(|m| m.spec.clone()).collect()
    }
}

fn load_model(dir: &Path) -> Result<Option<RepoModel>, Vec<String>> {
    let config_path = dir.join("config.toml");
    if !config_path.exists() {
        return Ok(None);
    }
    let at = |e: &dyn fmt::Display| format!("{}: {e}", config_path.display());
    let text = std::fs::read_to_string(&config_path).map_err(|e| vec![at(&e)])?;
    let config = ModelConfig::parse(&text).map_err(|e| vec![at(&e)])?;
    let dir_name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut problems = Vec::new();
    if config.name != dir_name {
        problems.push(at(&ModelConfigError::NameMismatch { config: config.name.clone(), dir: dir_name }));
    }
    let version = latest_version(dir);
    if version.is_none() {
        problems.push(format!(
            "{}: no version directory with a model.pt (expected {0}/1/model.pt)",
            dir.display()
        ));
    }
    match config.validate(version.unwrap_or(0)) {
        Ok(spec) if problems.is_empty() => {
            let path = dir.join(spec.version.to_string()).join("model.pt");
            Ok(Some(RepoModel { spec, path }))
        }
        Ok(_) => Err(problems),
        Err(errs) => {
            problems.extend(errs.iter().map(|e| at(e)));
            Err(problems)
        }
    }
}

fn latest_version(dir: &Path) -> Option<u32> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<u32>().ok().filter(|_| e.path().join("model.pt").is_file())
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
name = "m"
platform = "torchscript"
max_batch_size = 4
[[input]]
name = "features"
data_type = "fp32"
dims = [2]
[[output]]
name = "score"
data_type = "fp32"
dims = []
"#;

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn serves_the_highest_version() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "m/config.toml", CONFIG);
        write(dir.path(), "m/1/model.pt", "x");
        write(dir.path(), "m/10/model.pt", "x");
        write(dir.path(), "m/2/README", "no model here");
        let repo = ModelRepository::load(dir.path()).unwrap();
        assert_eq!(repo.models.len(), 1);
        assert_eq!(repo.models[0].spec.version, 10);
        assert!(repo.models[0].path.ends_with("m/10/model.pt"));
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a/config.toml", CONFIG); // name mismatch, no version
        write(dir.path(), "b/config.toml", "name = ");
        write(dir.path(), "c/config.toml", &CONFIG.replace("\"m\"", "\"c\"").replace("fp32", "fp16"));
        write(dir.path(), "c/1/model.pt", "x");
        let err = ModelRepository::load(dir.path()).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.problems.len(), 5, "{text}");
        assert!(
            text.contains("a/config.toml: config name \"m\" does not match its directory \"a\""),
            "{text}"
        );
        assert!(text.contains("no version directory"), "{text}");
        assert!(text.contains("b/config.toml: invalid TOML"), "{text}");
        assert!(text.contains("unsupported data_type \"fp16\""), "{text}");
    }

    #[test]
    fn a_missing_or_empty_repository_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ModelRepository::load(dir.path()).unwrap_err().to_string().contains("no models found"));
        let err = ModelRepository::load(&dir.path().join("nope")).unwrap_err();
        assert!(err.to_string().contains("cannot read directory"), "{err}");
    }
}
