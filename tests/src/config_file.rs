//! relayd configuration files written for one test, removed on drop (also when it fails).

use std::path::PathBuf;

pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(contents: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("{}.toml", crate::unique("relay-config-")));
        std::fs::write(&path, contents)
            .unwrap_or_else(|err| panic!("writing {}: {err}", path.display()));
        ConfigFile(path)
    }

    /// Replaces the contents (a reload test edits the file relayd runs with).
    pub fn rewrite(&self, contents: &str) {
        std::fs::write(&self.0, contents)
            .unwrap_or_else(|err| panic!("writing {}: {err}", self.0.display()));
    }

    pub fn path(&self) -> &str {
        self.0.to_str().expect("temporary paths are UTF-8")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
