package coordinator

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/signal-p2p/signal/audit"
	"github.com/signal-p2p/signal/protocol"
)

// Audits of optim_step. A forward_backward's figures can be replayed from
// a state committed after the call (audit.go), but an optim_step changes
// the adapter: the state after it is not the state it ran on, and asking
// a node to commit its state before the call would tell a liar which step
// is watched. So the leader keeps, per run, a trail: the latest full state
// the node committed after a call (an anchor: the automatic checkpoint
// optim_step writes every checkpoint_every steps, or an earlier optim
// audit's commit) and every forward_backward and optim_step since, with
// the node's answers. An audited optim_step has the node commit its state
// after answering (or takes the automatic checkpoint it wrote); the
// validator resumes from the anchor, replays the trail — comparing each
// forward_backward's figures as a spot-check does — and its adapter after
// the audited step must match the node's (audit.CompareAdapters). A step
// skipped or taken with a made-up gradient anywhere since the anchor shows
// in the adapter. The commit becomes the next anchor, so each audit
// replays only the calls since the previous one or the last checkpoint.
//
// An optim_step is chosen with probability AuditRate divided by the
// optim_steps its replay would take (s+1 with s steps on the trail, s <
// anchorEvery), so the replayed compute per step stays at AuditRate. A
// node that lies on every step is caught in a window of anchorEvery
// steps with probability 1 − Π(1 − AuditRate/(s+1)).

// Trail bounds: a run whose calls since its anchor pass them has no trail
// (its optim_steps are not audited) until the next anchor.
const (
	// anchorEvery is how many optim_steps a trail holds before the leader
	// has the node commit its state as the next anchor (when no automatic
	// checkpoint came sooner): the commit follows an answer, so it tells
	// the node nothing about which step is audited.
	anchorEvery        = 8
	maxTrailCalls      = 64
	maxTrailBytes      = 4 << 20
	maxTrailBytesTotal = 256 << 20
	// maxAdapterFileBytes bounds an adapter file the leader reads to
	// compare: larger ones make the audit inconclusive.
	maxAdapterFileBytes = 512 << 20
)

// TrailCall is one call of a trail: what was sent, what the node answered
// and what it cost.
type TrailCall struct {
	Call   protocol.Call   `json:"call"`
	Body   json.RawMessage `json:"body"`
	Answer json.RawMessage `json:"answer"`
	Cost   int64           `json:"cost"`
}

// trail is a run's calls since its anchor.
type trail struct {
	node   string
	anchor protocol.Checkpoint
	calls  []TrailCall
	bytes  int
	steps  int // optim_steps among calls
}

// follows says whether tr continues run as its call finds it: same node,
// and the anchor's step plus the steps since is the run's step.
func (tr *trail) follows(run *RunRecord) bool {
	return tr != nil && tr.node == run.Run.Node && tr.anchor.Step+tr.steps == run.Run.Step
}

// anchorGap is how many optim_steps run's trail holds before the leader
// asks for an anchor: anchorEvery, or the run's own checkpoint_every when
// its automatic checkpoints come at least every 2·anchorEvery steps — they
// are anchors already, and a commit besides them would be a full save
// more for nothing (the default checkpoint_every, 10, needs none).
func anchorGap(run *RunRecord) int {
	if ce := run.Run.CheckpointEvery; ce > 0 && ce <= 2*anchorEvery {
		return ce + 1 // the checkpoint after the ce-th step resets the trail first
	}
	return anchorEvery
}

// optimDraw is the probability with which choose audits an optim_step of
// run: AuditRate over the optim_steps its replay would take.
func (a *auditor) optimDraw(run *RunRecord) float64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	tr := a.trails[run.Run.ID]
	if !tr.follows(run) {
		return a.c.cfg.AuditRate // no trail: a chosen step commits the first anchor
	}
	return a.c.cfg.AuditRate / float64(tr.steps+1)
}

// follow updates run's trail after one of its calls was answered and
// charged, in the run's turn; an audited optim_step becomes an audit.
// cp is the checkpoint the call wrote that the run recorded (optim_step's
// automatic one), or nil.
func (a *auditor) follow(ctx context.Context, run *RunRecord, model ModelSpec, call protocol.Call, tc TrailCall, cp *protocol.Checkpoint, audited bool) {
	defer a.unpinReleased()
	switch call {
	case protocol.CallForward, protocol.CallSample, protocol.CallSaveState:
		return // the state is as it was
	case protocol.CallForwardBackward:
		a.mu.Lock()
		defer a.mu.Unlock()
		if tr := a.trails[run.Run.ID]; tr.follows(run) {
			a.extend(run.Run.ID, tr, tc)
		}
		return
	case protocol.CallOptimStep:
	default:
		a.forget(run.Run.ID)
		return
	}
	a.mu.Lock()
	tr := a.trails[run.Run.ID]
	if !tr.follows(run) {
		tr = nil
	}
	a.mu.Unlock()
	post, owned := cp, false
	// A trail that holds as many steps as it may is anchored now, so that
	// replays stay short; so is a run without one, unless its own
	// automatic checkpoints will anchor it soon (anchorGap).
	id := "aud_" + newID(8)
	gap := anchorGap(run)
	if post == nil && (audited || tr == nil && gap == anchorEvery || tr != nil && tr.steps+1 >= gap) {
		if got, ok := a.commitSnapshot(ctx, run, call, id, "full"); ok {
			post, owned = &got, true
		}
	}
	switch {
	case post == nil:
		// No new anchor: the step joins the trail.
		a.mu.Lock()
		if tr != nil && a.trails[run.Run.ID] == tr {
			a.extend(run.Run.ID, tr, tc)
		}
		a.mu.Unlock()
		return
	case audited && tr != nil:
		a.chosen.Add(1)
		calls := append(append([]TrailCall(nil), tr.calls...), tc)
		var cost int64
		for _, c := range calls {
			cost += c.Cost
		}
		job := auditJob{id: id, run: *run, model: model, node: run.Run.Node, operator: a.operatorOf(run.Run.Node), call: call,
			body: tc.Body, answer: tc.Answer, cost: cost, pre: tr.anchor, post: post, trail: calls}
		a.pin(job.pre)
		if owned {
			a.own(*post)
		}
		a.pin(*post)
		a.recordPending(ctx, job)
		a.enqueue(job)
	case owned:
		a.own(*post) // the first anchor of a run without a trail
	}
	a.anchor(run, *post)
}

// extend adds tc to run's trail tr, or drops the trail past its bounds.
// a.mu is held.
func (a *auditor) extend(runID string, tr *trail, tc TrailCall) {
	n := len(tc.Body) + len(tc.Answer)
	if len(tr.calls)+1 > maxTrailCalls || tr.bytes+n > maxTrailBytes || a.trailBytes+n > maxTrailBytesTotal {
		a.dropTrail(runID)
		return
	}
	tr.calls = append(tr.calls, tc)
	tr.bytes += n
	a.trailBytes += n
	if tc.Call == protocol.CallOptimStep {
		tr.steps++
	}
}

// anchor starts run's trail at cp, the full state its node committed.
func (a *auditor) anchor(run *RunRecord, cp protocol.Checkpoint) {
	a.pin(cp)
	a.mu.Lock()
	a.dropTrail(run.Run.ID)
	a.trails[run.Run.ID] = &trail{node: run.Run.Node, anchor: cp}
	a.mu.Unlock()
}

// forget drops run's trail: a call changed its state outside one.
func (a *auditor) forget(runID string) {
	a.mu.Lock()
	a.dropTrail(runID)
	a.mu.Unlock()
	a.unpinReleased()
}

// pruneTrails drops the trails of runs that ended or left their node.
func (a *auditor) pruneTrails() {
	a.mu.Lock()
	ids := make(map[string]string, len(a.trails))
	for id, tr := range a.trails {
		ids[id] = tr.node
	}
	a.mu.Unlock()
	var gone []string
	a.c.fsm.read(func(s *State) {
		for id, node := range ids {
			if r, ok := s.Run(id); !ok || r.Run.Node != node || r.Run.Status != protocol.RunReady {
				gone = append(gone, id)
			}
		}
	})
	for _, id := range gone {
		a.forget(id)
	}
}

// dropTrail removes a trail and unpins its anchor. a.mu is held.
func (a *auditor) dropTrail(runID string) {
	tr := a.trails[runID]
	if tr == nil {
		return
	}
	delete(a.trails, runID)
	a.trailBytes -= tr.bytes
	a.released = append(a.released, tr.anchor)
}

// unpinReleased unpins the anchors of trails that ended (deleting the
// files of owned ones no one needs): outside a.mu, as deleting is I/O.
func (a *auditor) unpinReleased() {
	a.mu.Lock()
	done := a.released
	a.released = nil
	a.mu.Unlock()
	for _, cp := range done {
		a.unpin(cp, true)
	}
}

// release unpins an optim_step audit's states once it ended: a pass or an
// inconclusive end discards them where no trail needs them; a failure
// keeps them as its evidence.
func (a *auditor) release(job auditJob, discard bool) {
	if job.post == nil {
		return
	}
	a.unpin(job.pre, discard)
	a.unpin(*job.post, discard)
}

// own marks cp as a state an audit committed (not a run checkpoint): its
// files are deleted once no trail or audit needs them.
func (a *auditor) own(cp protocol.Checkpoint) {
	a.mu.Lock()
	if _, ok := a.owned[cp.ID]; !ok {
		a.owned[cp.ID] = 0
	}
	a.mu.Unlock()
}

// pin notes one more user (a trail, an audit) of an owned state.
func (a *auditor) pin(cp protocol.Checkpoint) {
	a.mu.Lock()
	if n, ok := a.owned[cp.ID]; ok {
		a.owned[cp.ID] = n + 1
	}
	a.mu.Unlock()
}

// unpin notes one user fewer of an owned state; with none left and
// discard set, its files are deleted (a failed audit keeps its states as
// evidence: discard false).
func (a *auditor) unpin(cp protocol.Checkpoint, discard bool) {
	a.mu.Lock()
	n, ok := a.owned[cp.ID]
	if ok {
		n--
		a.owned[cp.ID] = n
	}
	if !ok || n > 0 {
		a.mu.Unlock()
		return
	}
	delete(a.owned, cp.ID)
	a.mu.Unlock()
	if discard {
		ctx, cancel := context.WithTimeout(context.Background(), a.c.cfg.CallTimeout)
		defer cancel()
		a.c.deleteUnreferenced(ctx, checkpointURIs(cp))
	}
}

// checkpointURIs are the objects of cp.
func checkpointURIs(cp protocol.Checkpoint) []string {
	uris := []string{cp.URI}
	for _, f := range cp.Files {
		uris = append(uris, f.URI)
	}
	return uris
}

// replayTrail runs an optim_step audit on the validator's session: the
// trail's calls in order (each forward_backward's figures compared with
// the node's), then save_state, and the two adapters compared.
func (a *auditor) replayTrail(ctx context.Context, job auditJob, call func(protocol.Call, any) (protocol.SessionResponse, error), tol audit.Tolerances) (audit.Check, error) {
	if job.post == nil {
		return audit.Check{}, fmt.Errorf("optim_step audit without the node's committed state: %w", errAuditInconclusive)
	}
	figures := audit.Check{Passed: true}
	for i, tc := range job.trail {
		resp, err := call(tc.Call, []byte(tc.Body))
		if err != nil {
			return audit.Check{}, fmt.Errorf("replay call %d (%s): %w", i, tc.Call, err)
		}
		if tc.Call != protocol.CallForwardBackward {
			continue
		}
		var claimed, replayed protocol.ForwardBackwardResponse
		if err := json.Unmarshal(tc.Answer, &claimed); err != nil {
			return audit.Check{Reason: fmt.Sprintf("the node's answer to call %d does not decode: %v", i, err)}, nil
		}
		if err := json.Unmarshal(resp.Body, &replayed); err != nil {
			return audit.Check{}, fmt.Errorf("validator's answer to call %d: %w", i, err)
		}
		k := audit.CompareForward(claimed, replayed, true, tol)
		if !k.Passed {
			k.Reason = fmt.Sprintf("forward_backward %d of the trail: %s", i, k.Reason)
			return k, nil
		}
		figures.Figures += k.Figures
		figures.Margin = max(figures.Margin, k.Margin)
	}
	body, _ := json.Marshal(protocol.SaveStateRequest{Mode: "adapter"})
	resp, err := call(protocol.CallSaveState, body)
	if err != nil {
		return audit.Check{}, fmt.Errorf("save the replayed adapter: %w", err)
	}
	if resp.Checkpoint == nil {
		return audit.Check{}, fmt.Errorf("validator's save_state without a checkpoint: %w", errAuditInconclusive)
	}
	mine := *resp.Checkpoint
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), a.c.cfg.CallTimeout)
		defer cancel()
		a.c.deleteUnreferenced(dctx, checkpointURIs(mine))
	}()
	replayed, err := a.readAdapter(ctx, mine)
	if err != nil {
		return audit.Check{}, fmt.Errorf("the validator's adapter: %w", err)
	}
	pre, err := a.readAdapter(ctx, job.pre)
	if err != nil {
		return audit.Check{}, fmt.Errorf("the anchor's adapter: %w", err)
	}
	claimed, err := a.readAdapter(ctx, *job.post)
	if err != nil {
		if errors.Is(err, errAuditInconclusive) {
			return audit.Check{}, err
		}
		return audit.Check{Reason: fmt.Sprintf("the node's committed state %s: %v", job.post.ID, err)}, nil
	}
	k := audit.CompareAdapters(pre, claimed, replayed, tol)
	k.Figures += figures.Figures
	k.Margin = max(k.Margin, figures.Margin)
	return k, nil
}

// readAdapter reads and decodes cp's adapter_model.safetensors from the
// network's store. A store this member cannot read makes the audit
// inconclusive; a file that does not decode is an error of its writer's.
func (a *auditor) readAdapter(ctx context.Context, cp protocol.Checkpoint) (audit.Adapters, error) {
	open := a.c.cfg.OpenCheckpointFile
	if open == nil {
		return nil, fmt.Errorf("this member cannot read checkpoint files: %w", errAuditInconclusive)
	}
	for _, f := range cp.Files {
		if f.Name != "adapter_model.safetensors" {
			continue
		}
		if f.Size <= 0 || f.Size > maxAdapterFileBytes {
			return nil, fmt.Errorf("adapter file of %d bytes (at most %d): %w", f.Size, maxAdapterFileBytes, errAuditInconclusive)
		}
		rc, err := open(ctx, f)
		if err != nil {
			return nil, fmt.Errorf("open %s: %v: %w", f.Name, err, errAuditInconclusive)
		}
		defer rc.Close()
		b, err := io.ReadAll(io.LimitReader(rc, f.Size+1))
		if err != nil {
			return nil, fmt.Errorf("read %s: %v: %w", f.Name, err, errAuditInconclusive)
		}
		if int64(len(b)) != f.Size {
			return nil, fmt.Errorf("%s: %d bytes, its manifest says %d", f.Name, len(b), f.Size)
		}
		return audit.DecodeAdapters(b)
	}
	return nil, fmt.Errorf("checkpoint %s has no adapter_model.safetensors", cp.ID)
}
