//! The catalog: sources and dataflow definitions, in the order they were created, with the
//! validated plans that workers receive. It is persisted atomically after every change and
//! replayed to the workers whenever a generation forms.

use serde::{Deserialize, Serialize};

use sundial_protocol::plan::{DataflowPlan, SourcePlan};
use sundial_protocol::Command;

/// Version of the `catalog.json` format this coordinator writes and reads.
pub const CATALOG_FORMAT: u32 = 1;

/// A source as created.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceEntry {
    /// What the user submitted.
    pub spec: serde_json::Value,
    /// What it validated to.
    pub plan: SourcePlan,
}

/// A dataflow as submitted.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DataflowEntry {
    /// What the user submitted.
    pub spec: serde_json::Value,
    /// What it validated to.
    pub plan: DataflowPlan,
}

/// Sources and dataflows.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    /// [`CATALOG_FORMAT`].
    pub format: u32,
    /// Sources, in creation order.
    pub sources: Vec<SourceEntry>,
    /// Dataflows, in creation order.
    pub dataflows: Vec<DataflowEntry>,
    /// The id of the newest dataflow ever created (ids are never reused).
    #[serde(default)]
    pub last_id: u64,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog { format: CATALOG_FORMAT, sources: Vec::new(), dataflows: Vec::new(), last_id: 0 }
    }
}

impl Catalog {
    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceEntry> {
        self.sources.iter().find(|s| s.plan.name == name)
    }

    /// The dataflow called `name`.
    pub fn dataflow(&self, name: &str) -> Option<&DataflowEntry> {
        self.dataflows.iter().find(|d| d.plan.name == name)
    }

    /// The id the next dataflow gets.
    pub fn next_id(&self) -> u64 {
        self.last_id.max(self.dataflows.iter().map(|d| d.plan.id).max().unwrap_or(0)) + 1
    }

    /// Gives every dataflow without an id (written by an older coordinator) one.
    pub fn assign_ids(&mut self) {
        for i in 0..self.dataflows.len() {
            if self.dataflows[i].plan.id == 0 {
                let id = self.next_id();
                self.dataflows[i].plan.id = id;
                self.last_id = id;
            }
        }
    }

    /// The commands that rebuild the catalog on a new generation: sources, then dataflows.
    pub fn replay(&self) -> Vec<Command> {
        self.sources
            .iter()
            .map(|s| Command::CreateSource(s.plan.clone()))
            .chain(self.dataflows.iter().map(|d| Command::InstallDataflow(d.plan.clone())))
            .collect()
    }
}
