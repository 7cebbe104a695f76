//! The engine's two shapes as functions: a move of one VM to one
//! destination ([`migrate_out_held`]) and a clone to several
//! ([`clone_out`]), both over the engine's own rounds.

use pagecast_memory::fingerprint::Fingerprinter;
use pagecast_proto::v1;

use crate::engine::{self, How, Mode, Spec, Target};
use crate::{
    Caster, Hold, MigrateOptions, MigrationError, MigrationLink, MigrationReport, Progress,
    SourceVm,
};

/// One destination of a clone.
pub type CloneTarget = Target<'static>;

/// Migrates `vm` over `link`. On success the VM is left paused for the
/// caller to release. On any failure before commit it runs again, every
/// dirty bit the engine took is handed back, and the destination is told to
/// abort; after commit without confirmation the error is
/// [`MigrationError::InDoubt`] and the VM stays paused.
pub fn migrate_out(
    vm: &dyn SourceVm,
    link: &mut dyn MigrationLink,
    fp: &Fingerprinter,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, MigrationError> {
    migrate_out_held(vm, link, fp, opts, progress, None)
}

/// [`migrate_out`], holding after the destination's first answer for a
/// gang job (`hold`), with keep-alives both ways meanwhile.
pub fn migrate_out_held(
    vm: &dyn SourceVm,
    link: &mut dyn MigrationLink,
    fp: &Fingerprinter,
    opts: &MigrateOptions,
    progress: &mut dyn FnMut(&Progress),
    hold: Option<&mut dyn Hold>,
) -> Result<MigrationReport, MigrationError> {
    let mut progress = progress;
    move_one(
        vm,
        Box::new(Borrowed(link)),
        fp,
        opts,
        &mut progress,
        shorten(hold),
        How::Rounds,
    )
}

/// The hold as the engine's lifetime takes it.
pub(crate) fn shorten<'s>(h: Option<&'s mut (dyn Hold + '_)>) -> Option<&'s mut (dyn Hold + 's)> {
    match h {
        Some(h) => Some(h),
        None => None,
    }
}

/// A move of `vm` over `link`, pages travelling as `how` says.
pub fn move_one<'a>(
    vm: &'a dyn SourceVm,
    link: Box<dyn MigrationLink + 'a>,
    fp: &Fingerprinter,
    opts: &'a MigrateOptions,
    progress: &'a mut (dyn FnMut(&Progress) + '_),
    hold: Option<&'a mut (dyn Hold + '_)>,
    how: How<'a>,
) -> Result<MigrationReport, MigrationError> {
    let out = engine::run(
        Spec {
            vm,
            mode: Mode::Move,
            targets: vec![Target {
                name: vm.name().to_owned(),
                host: String::new(),
                link,
            }],
            opts,
            progress,
            hold: shorten(hold),
            caster: None,
            how,
        },
        fp,
    );
    let mut dests = out.dests;
    let d = dests.pop().expect("one destination");
    match (d.ok, d.error, out.source_error) {
        (true, _, _) => Ok(out.report),
        (false, Some(e), _) | (false, None, Some(e)) => Err(e),
        (false, None, None) => Err(MigrationError::Protocol("left unfinished".into())),
    }
}

/// A link the caller keeps.
struct Borrowed<'a>(&'a mut dyn MigrationLink);

impl MigrationLink for Borrowed<'_> {
    fn send(&mut self, body: v1::migrate_frame::Body) -> Result<(), MigrationError> {
        self.0.send(body)
    }
    fn recv(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> Result<v1::migrate_frame::Body, MigrationError> {
        self.0.recv(timeout)
    }
    fn peer(&self) -> String {
        self.0.peer()
    }
    fn poll_frame(&mut self) -> Result<Option<v1::migrate_frame::Body>, MigrationError> {
        self.0.poll_frame()
    }
    fn send_if_idle(&mut self, body: v1::migrate_frame::Body) -> Result<bool, MigrationError> {
        self.0.send_if_idle(body)
    }
}

/// One clone's outcome.
#[derive(Debug, Clone, Default)]
pub struct CloneResultOne {
    /// The clone's name.
    pub name: String,
    /// Its host.
    pub host: String,
    /// It runs there.
    pub ok: bool,
    /// Its memory matched the source's at switchover.
    pub verified: bool,
    /// Why not.
    pub error: Option<v1::Refusal>,
}

/// What a clone did.
#[derive(Debug, Clone, Default)]
pub struct CloneReportAll {
    /// Per destination.
    pub clones: Vec<CloneResultOne>,
    /// Bytes sent over the links.
    pub bytes_links: u64,
    /// Bytes sent by casts.
    pub bytes_cast: u64,
    /// The source VM's pause.
    pub downtime_ms: f64,
    /// From start to finish.
    pub total_ms: f64,
    /// Pre-copy rounds (after round 0).
    pub rounds: u32,
}

/// Clones `vm` to every target, pages travelling as `how` says. The
/// source VM runs on whatever happens. `hold` is asked whether the job
/// was cancelled (a clone is never held).
#[allow(clippy::too_many_arguments)]
pub fn clone_out<'a>(
    vm: &'a dyn SourceVm,
    targets: Vec<Target<'a>>,
    caster: &'a mut (dyn Caster + '_),
    fp: &Fingerprinter,
    opts: &'a MigrateOptions,
    progress: &'a mut (dyn FnMut(&Progress) + '_),
    hold: Option<&'a mut (dyn Hold + '_)>,
    how: How<'a>,
) -> CloneReportAll {
    let out = engine::run(
        Spec {
            vm,
            mode: Mode::Clone,
            targets,
            opts,
            progress,
            hold: shorten(hold),
            caster: Some(caster),
            how,
        },
        fp,
    );
    let source = out.source_error.as_ref();
    CloneReportAll {
        clones: out
            .dests
            .iter()
            .map(|d| CloneResultOne {
                name: d.name.clone(),
                host: d.host.clone(),
                ok: d.ok,
                verified: d.verified,
                error: d.refusal(source),
            })
            .collect(),
        bytes_links: out.report.bytes_sent,
        bytes_cast: out.bytes_cast,
        downtime_ms: out.report.downtime_ms,
        total_ms: out.report.total_ms,
        rounds: out.report.rounds.len().saturating_sub(2) as u32,
    }
}
