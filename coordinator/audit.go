package coordinator

import (
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"sync"
	"sync/atomic"
	"time"

	"github.com/signal-p2p/signal/audit"
	"github.com/signal-p2p/signal/protocol"
)

// Spot-check audits (issue 16). The leader audits a fraction AuditRate of
// the billed forward_backward, forward and sample calls, chosen per call
// with crypto/rand, so a node cannot tell which of its calls will be
// checked. After an audited call has answered (and been charged), still
// in the run's turn, the node is asked to commit the run's state: a
// save_state checkpoint (full for forward_backward), recorded as the
// audit's pre-state and never as a run checkpoint, and billed to nobody.
// These calls leave the adapter as it was — forward and sample change
// nothing, forward_backward only adds to the pending gradient, which its
// figures do not depend on — so the state committed after the call is
// the state the call ran on, and the node learns of the audit only once
// its answer is given. (Committing before the call, the obvious order,
// would tell a liar which calls to answer honestly.)
//
// A validator — a live node of another operator, picked at random — then
// replays the call in the background: it opens a temporary session
// resumed from the pre-state, sends the same request (a sample's tokens
// are scored with one forward instead, and greedy samples compared with
// its own), and closes it; package audit compares the answers. A failure
// is confirmed by a second validator of a third operator where one is
// live: a stranger validating is a stranger too, and one that fails
// honest nodes is outvoted (and its disputed count grows). The verdict goes
// through raft (cmdAuditResult, escrow.go): a pass verifies the node's
// held earnings, a failure forfeits them to their payers and quarantines
// the node, whose runs the failover loop then moves.

// auditCommitStrikes is how many audits in a row a node may fail to
// commit its state for before that counts as a failed audit: a node that
// lied and then will not show its state must not escape, while a storage
// glitch is forgiven.
const auditCommitStrikes = 3

// auditQueue bounds the audits waiting for a validator; beyond it an
// audit is dropped (logged), never the call that chose it.
const auditQueue = 64

// errAuditInconclusive means an audit could not be run (no validator,
// a validator lost, text prompts this member cannot tokenize): nothing is
// recorded, and the node's earnings stay held until a later audit.
var errAuditInconclusive = errors.New("audit inconclusive")

// auditJob is one audited call, with what the validator needs to replay it.
type auditJob struct {
	id       string
	run      RunRecord
	model    ModelSpec
	node     string
	operator string
	call     protocol.Call
	body     []byte
	answer   json.RawMessage // the node's answer body
	cost     int64           // what the call was charged: caps the validator's pay
	pre      protocol.Checkpoint
	// An optim_step's audit (audittrail.go) replays trail from pre, its
	// anchor, and compares the adapter with post, the node's commit.
	post  *protocol.Checkpoint
	trail []TrailCall
}

// auditor runs the audits: it owns its workers (Start, Stop) and the
// leader's memory of nodes that failed to commit their state.
type auditor struct {
	c    *Coordinator
	jobs chan auditJob

	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	strikes map[string]int // node → audits in a row it failed to commit state for
	// active holds the audits queued or running here, so a resume does
	// not queue one twice.
	active map[string]bool
	// trails are the runs' calls since their anchors (audittrail.go);
	// trailBytes their bodies' total. owned counts the users of each
	// state an audit committed; released are anchors whose trails ended,
	// to unpin once a.mu is let go.
	trails     map[string]*trail
	trailBytes int
	owned      map[string]int
	released   []protocol.Checkpoint

	// Counters for tests and logs.
	chosen, passed, failed, inconclusive atomic.Int64
	// replayCredits is what the validators' replays would cost at the
	// model's prices and auditedCredits what the audited calls cost: their
	// ratio is the audit's cost per audited call, as a fraction of the call.
	replayCredits, auditedCredits atomic.Int64
}

func newAuditor(c *Coordinator) *auditor {
	return &auditor{c: c, jobs: make(chan auditJob, auditQueue), strikes: map[string]int{}, active: map[string]bool{},
		trails: map[string]*trail{}, owned: map[string]int{}}
}

// Start runs workers workers until Stop.
func (a *auditor) Start(ctx context.Context, workers int) {
	ctx, a.cancel = context.WithCancel(ctx)
	for range workers {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case job := <-a.jobs:
					a.run(ctx, job)
				}
			}
		}()
	}
}

// Stop ends the workers (an audit in progress is abandoned) and waits.
func (a *auditor) Stop() {
	if a.cancel != nil {
		a.cancel()
	}
	a.wg.Wait()
}

// auditable says whether a call is of a kind audits replay.
func auditable(call protocol.Call) bool {
	switch call {
	case protocol.CallForwardBackward, protocol.CallForward, protocol.CallSample, protocol.CallOptimStep:
		return true
	}
	return false
}

// choose decides whether to audit a call the run's node is about to
// answer: never when no node of another operator could validate it; always
// when the node failed to commit its state for its last audit or holds
// earnings no audit has covered for longer than the escrow window (so
// every node's earnings are eventually decided); otherwise with
// probability AuditRate (an optim_step's scaled by its replay's length:
// optimDraw), from crypto/rand.
func (a *auditor) choose(run *RunRecord, call protocol.Call, model ModelSpec) bool {
	c := a.c
	if c.cfg.AuditRate <= 0 || !auditable(call) || run.Run.Node == "" {
		return false
	}
	var operator string
	var quarantined, stale bool
	c.fsm.read(func(s *State) {
		n, _ := s.Node(run.Run.Node)
		operator = n.Operator
		quarantined = s.Quarantined(run.Run.Node)
		if since, ok := s.UnauditedSince(run.Run.Node); ok {
			stale = time.Since(time.UnixMilli(since)) > c.cfg.EscrowWindow
		}
	})
	if operator == "" || quarantined || len(c.validators(model, run.Run.Node, map[string]bool{operator: true})) == 0 {
		return false
	}
	a.mu.Lock()
	due := a.strikes[run.Run.Node] > 0
	a.mu.Unlock()
	rate := c.cfg.AuditRate
	if call == protocol.CallOptimStep {
		rate = a.optimDraw(run)
	}
	return due || stale || randFloat() < rate
}

// randFloat is uniform in [0, 1) from crypto/rand: a node cannot predict it.
func randFloat() float64 {
	var b [8]byte
	if _, err := crand.Read(b[:]); err != nil {
		return 1 // never audit on a broken entropy source rather than always
	}
	return float64(binary.LittleEndian.Uint64(b[:])>>11) / (1 << 53)
}

// randSeed is a non-negative int64 from crypto/rand.
func randSeed() int64 {
	var b [8]byte
	_, _ = crand.Read(b[:]) // crypto/rand.Read does not fail (Go ≥ 1.24)
	return int64(binary.LittleEndian.Uint64(b[:]) >> 1)
}

// randIndex is uniform in [0, n) from crypto/rand.
func randIndex(n int) int {
	v, err := crand.Int(crand.Reader, big.NewInt(int64(n)))
	if err != nil {
		return 0
	}
	return int(v.Int64())
}

// validators are the live nodes that may validate an audit of node: joined,
// not quarantined, of none of the operators in exclude (never the audited
// node's own), with an engine up that serves model.
func (c *Coordinator) validators(model ModelSpec, node string, exclude map[string]bool) []protocol.Node {
	return c.validatorsWhere(node, exclude, func(n protocol.Node) bool {
		return containsString(n.Models, model.Name) || fits(n, memoryOn(n, model))
	})
}

// validatorsWhere are the live, joined, unquarantined nodes with an engine
// and a free session, of none of the operators in exclude, other than
// node, for which can holds.
func (c *Coordinator) validatorsWhere(node string, exclude map[string]bool, can func(protocol.Node) bool) []protocol.Node {
	nodes := c.nodesBackend().Nodes()
	var out []protocol.Node
	c.fsm.read(func(s *State) {
		for _, n := range nodes {
			rec, joined := s.Node(n.PeerID)
			if !joined || n.PeerID == node || exclude[rec.Operator] || s.Quarantined(n.PeerID) || len(n.Backends) == 0 {
				continue
			}
			if n.MaxSessions > 0 && n.Sessions >= n.MaxSessions {
				continue
			}
			if !can(n) {
				continue
			}
			n.Operator = rec.Operator
			out = append(out, n)
		}
	})
	return out
}

func containsString(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// commit asks the run's node to commit the state an audited call ran on,
// and queues the audit. It runs in the run's turn, after the call's
// charge; a node that cannot commit gets a strike instead, and a failed
// audit at auditCommitStrikes in a row.
func (a *auditor) commit(ctx context.Context, run *RunRecord, model ModelSpec, call protocol.Call, body []byte, answer json.RawMessage, cost int64) {
	job, ok := a.commitState(ctx, run, model, call, body, answer, cost)
	if !ok {
		return
	}
	a.enqueue(job)
}

// commitState has the node commit the audited call's state and records
// the audit as pending: durable before it is queued, so a leader that dies
// from here on leaves the audit to the next one (auditqueue.go).
func (a *auditor) commitState(ctx context.Context, run *RunRecord, model ModelSpec, call protocol.Call, body []byte, answer json.RawMessage, cost int64) (auditJob, bool) {
	a.chosen.Add(1)
	id := "aud_" + newID(8)
	mode := "adapter"
	if call == protocol.CallForwardBackward {
		mode = "full"
	}
	pre, ok := a.commitSnapshot(ctx, run, call, id, mode)
	if !ok {
		return auditJob{}, false
	}
	job := auditJob{id: id, run: *run, model: model, node: run.Run.Node, operator: a.operatorOf(run.Run.Node), call: call,
		body: append([]byte(nil), body...), answer: answer, cost: cost, pre: pre}
	a.recordPending(ctx, job)
	return job, true
}

// operatorOf is the account node joined under.
func (a *auditor) operatorOf(node string) string {
	var operator string
	a.c.fsm.read(func(s *State) { n, _ := s.Node(node); operator = n.Operator })
	return operator
}

// recordPending makes job a raft record before it is queued, so a leader
// that dies from here on leaves the audit to the next one (auditqueue.go).
func (a *auditor) recordPending(ctx context.Context, job auditJob) {
	p := job.pending()
	if _, err := a.c.propose(ctx, cmdAuditQueue, auditQueueCmd{Put: &p}); err != nil {
		a.c.log.Warn("record pending audit", "category", "audit", "audit", job.id, "err", err)
	}
}

// commitSnapshot asks the run's node to save its state (mode) for audit
// id, after call answered: a state at the run's step, or the next one
// after an optim_step. A node that cannot gets a strike, and a failed
// audit at auditCommitStrikes in a row.
func (a *auditor) commitSnapshot(ctx context.Context, run *RunRecord, call protocol.Call, id, mode string) (protocol.Checkpoint, bool) {
	c := a.c
	log := c.log.With("category", "audit", "audit", id, "run", run.Run.ID, "node", run.Run.Node, "call", call)
	reqBody, _ := json.Marshal(protocol.SaveStateRequest{Mode: mode})
	resp, err := c.nodesBackend().Do(ctx, run.Run.Node, protocol.SessionRequest{RequestID: id + "/state", RunID: run.Run.ID, Call: protocol.CallSaveState, Body: reqBody})
	if err == nil && resp.Error != nil {
		err = nodeError(resp.Error)
	}
	if err == nil && resp.Checkpoint == nil {
		err = fmt.Errorf("save_state answer without a checkpoint: %w", ErrBadNodeAnswer)
	}
	if err == nil {
		err = c.checkCheckpoint(run.Run, *resp.Checkpoint, run.Run.Step, mode)
	}
	if want := run.Run.Step + 1; err == nil && call == protocol.CallOptimStep && resp.Checkpoint.Step != want {
		err = fmt.Errorf("state after optim_step at step %d, want %d: %w", resp.Checkpoint.Step, want, ErrBadNodeAnswer)
	}
	if err != nil {
		a.mu.Lock()
		a.strikes[run.Run.Node]++
		strikes := a.strikes[run.Run.Node]
		if strikes >= auditCommitStrikes {
			delete(a.strikes, run.Run.Node)
		}
		a.mu.Unlock()
		log.Warn("node did not commit its state for an audit", "strikes", strikes, "err", err)
		if strikes >= auditCommitStrikes {
			a.record(ctx, auditJob{id: id, run: *run, node: run.Run.Node, call: call}, "", audit.Check{
				Reason: fmt.Sprintf("the node did not commit its state for %d audits in a row (last: %v)", strikes, protocol.UserMessage(err))}, "", 0, "")
		}
		return protocol.Checkpoint{}, false
	}
	a.mu.Lock()
	delete(a.strikes, run.Run.Node)
	a.mu.Unlock()
	return *resp.Checkpoint, true
}

// enqueue queues job unless this auditor holds it already.
func (a *auditor) enqueue(job auditJob) {
	a.mu.Lock()
	if a.active[job.id] {
		a.mu.Unlock()
		return
	}
	a.active[job.id] = true
	a.mu.Unlock()
	select {
	case a.jobs <- job:
	default:
		a.mu.Lock()
		delete(a.active, job.id)
		a.mu.Unlock()
		// Left pending: a later resume queues it when there is room.
		a.c.log.Warn("audit queue full; the audit waits", "category", "audit", "audit", job.id)
	}
}

// drop ends a pending audit that will not be recorded (inconclusive).
func (a *auditor) drop(id string) {
	ctx, cancel := context.WithTimeout(context.Background(), a.c.cfg.ApplyTimeout)
	defer cancel()
	if _, err := a.c.propose(ctx, cmdAuditQueue, auditQueueCmd{Drop: []string{id}}); err != nil {
		a.c.log.Warn("drop pending audit", "category", "audit", "audit", id, "err", err)
	}
}

// run validates one audited call and records the verdict.
func (a *auditor) run(ctx context.Context, job auditJob) {
	defer func() {
		a.mu.Lock()
		delete(a.active, job.id)
		a.mu.Unlock()
	}()
	c := a.c
	log := c.log.With("category", "audit", "audit", job.id, "run", job.run.Run.ID, "node", job.node, "call", job.call)
	exclude := map[string]bool{job.operator: true}
	first, check, pay, err := a.validate(ctx, job, exclude)
	if err != nil {
		a.inconclusive.Add(1)
		log.Warn("audit inconclusive", "err", err)
		if ctx.Err() == nil && c.IsLeader() {
			a.drop(job.id)
			a.release(job, true)
		}
		return
	}
	validator, disputed := first, ""
	if !check.Passed {
		// A stranger's failure verdict is confirmed by a stranger of a
		// third operator where there is one; where there is none, it stands.
		exclude[first.Operator] = true
		second, again, pay2, err := a.validate(ctx, job, exclude)
		switch {
		case err != nil:
			log.Info("audit failure not confirmed by a second validator", "first", first.PeerID, "err", err)
		case again.Passed:
			log.Warn("a second validator overturned an audit failure", "first", first.PeerID, "first_reason", check.Reason, "second", second.PeerID)
			validator, disputed, check, pay = second, first.PeerID, again, pay2
		default:
			validator, check, pay = second, again, pay2
		}
	}
	a.record(ctx, job, validator.PeerID, check, validator.Operator, pay, disputed)
	if job.post != nil {
		a.release(job, check.Passed)
		return
	}
	if check.Passed {
		// A passed audit's pre-state has served; a failed one's is kept as
		// the evidence. Files a run's checkpoint names stay (they are
		// content-addressed: the same adapter is the same file).
		uris := []string{job.pre.URI}
		for _, f := range job.pre.Files {
			uris = append(uris, f.URI)
		}
		c.deleteUnreferenced(ctx, uris)
	}
}

// record proposes a verdict.
func (a *auditor) record(ctx context.Context, job auditJob, validator string, check audit.Check, validatorOperator string, pay int64, disputed string) {
	c := a.c
	at := time.Now()
	cmd := auditResultCmd{Node: job.node, At: at.UnixMilli(), ValidatorOperator: validatorOperator, ValidatorPay: pay, Disputed: disputed,
		Audit: protocol.Audit{ID: job.id, RunID: job.run.Run.ID, Call: string(job.call), Validator: validator, PreState: job.pre.ID,
			Passed: check.Passed, Reason: check.Reason, Margin: check.Margin, Time: at.UTC().Format(time.RFC3339Nano)}}
	log := c.log.With("category", "audit", "audit", job.id, "run", job.run.Run.ID, "node", job.node, "call", job.call, "validator", validator)
	v, err := c.propose(ctx, cmdAuditResult, cmd)
	if err != nil {
		a.inconclusive.Add(1)
		log.Warn("record audit verdict", "err", err)
		return
	}
	out, _ := v.(AuditOutcome)
	if check.Passed {
		a.passed.Add(1)
		log.Info("audit passed", "margin", check.Margin, "figures", check.Figures, "verified_micro_credits", out.Verified)
		return
	}
	a.failed.Add(1)
	var refunded int64
	for _, r := range out.Refunds {
		refunded += r.Amount
	}
	log.Warn("audit failed: node quarantined, its held earnings refunded", "reason", check.Reason, "refunded_micro_credits", refunded)
}

// validate picks a validator outside exclude and replays job on it; a
// validator that cannot run the replay is replaced once.
func (a *auditor) validate(ctx context.Context, job auditJob, exclude map[string]bool) (protocol.Node, audit.Check, int64, error) {
	tried := map[string]bool{}
	var lastErr error
	for range 2 {
		var cands []protocol.Node
		for _, n := range a.c.validators(job.model, job.node, exclude) {
			if !tried[n.PeerID] {
				cands = append(cands, n)
			}
		}
		if len(cands) == 0 {
			if lastErr == nil {
				lastErr = fmt.Errorf("no live node of another operator serves %s: %w", job.model.Name, errAuditInconclusive)
			}
			return protocol.Node{}, audit.Check{}, 0, lastErr
		}
		v := cands[randIndex(len(cands))]
		tried[v.PeerID] = true
		check, usage, err := a.replay(ctx, job, v.PeerID)
		if err == nil {
			priced := priceUsage(job.model.Prices, usage).MicroCredits
			a.replayCredits.Add(priced)
			a.auditedCredits.Add(job.cost)
			return v, check, min(priced, job.cost), nil
		}
		lastErr = fmt.Errorf("validator %s: %w", v.PeerID, err)
		if ctx.Err() != nil {
			break
		}
	}
	return protocol.Node{}, audit.Check{}, 0, fmt.Errorf("%w: %w", errAuditInconclusive, lastErr)
}

// replay runs job's call on validator in a temporary session resumed from
// the pre-state and compares. A pre-state the validator's engine refuses
// to load is a failed check (the node committed a state that is not one);
// a validator that is lost or busy is an error.
func (a *auditor) replay(ctx context.Context, job auditJob, validator string) (audit.Check, protocol.Usage, error) {
	c := a.c
	// A trail's replay is several calls: each gets a call's time.
	ctx, cancel := context.WithTimeout(ctx, time.Duration(1+len(job.trail))*c.cfg.CallTimeout)
	defer cancel()
	sess := "audit-" + job.id + "-" + validator[max(0, len(validator)-6):]
	r := job.run
	spec := protocol.SessionSpec{RunID: sess, BaseModel: r.Run.BaseModel, LoRARank: r.Run.LoRARank, LoRAAlpha: r.Run.LoRAAlpha,
		TargetModules: r.Run.TargetModules, Seed: r.Seed, LRSchedule: r.LRSchedule, ResumeFrom: &job.pre}
	var usage protocol.Usage
	n := 0
	call := func(name protocol.Call, body any) (protocol.SessionResponse, error) {
		b, ok := body.([]byte)
		if !ok {
			var err error
			if b, err = json.Marshal(body); err != nil {
				return protocol.SessionResponse{}, err
			}
		}
		n++
		resp, err := c.nodesBackend().Do(ctx, validator, protocol.SessionRequest{RequestID: fmt.Sprintf("%s/%d", sess, n), RunID: sess, Call: name, Body: b})
		if err == nil && resp.Error != nil {
			err = nodeError(resp.Error)
		}
		if err != nil {
			return protocol.SessionResponse{}, err
		}
		usage.TrainTokens += max(resp.Usage.TrainTokens, 0)
		usage.PrefillTokens += max(resp.Usage.PrefillTokens, 0)
		usage.SampledTokens += max(resp.Usage.SampledTokens, 0)
		return resp, nil
	}
	if _, err := call(protocol.CallInit, spec); err != nil {
		if errors.Is(err, ErrInvalidRequest) || errors.Is(err, ErrNotFound) {
			return audit.Check{Reason: fmt.Sprintf("the committed state %s does not load: %s", job.pre.ID, protocol.UserMessage(err))}, usage, nil
		}
		return audit.Check{}, usage, fmt.Errorf("open the replay session: %w", err)
	}
	defer func() {
		cctx, ccancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer ccancel()
		_, _ = c.nodesBackend().Do(cctx, validator, protocol.SessionRequest{RequestID: sess + "/close", RunID: sess, Call: protocol.CallClose})
	}()
	tol := audit.DefaultTolerances()
	switch job.call {
	case protocol.CallForwardBackward, protocol.CallForward:
		var claimed, replayed protocol.ForwardBackwardResponse
		if err := json.Unmarshal(job.answer, &claimed); err != nil {
			return audit.Check{Reason: fmt.Sprintf("the node's answer does not decode: %v", err)}, usage, nil
		}
		resp, err := call(job.call, job.body)
		if err != nil {
			return audit.Check{}, usage, fmt.Errorf("replay %s: %w", job.call, err)
		}
		if err := json.Unmarshal(resp.Body, &replayed); err != nil {
			return audit.Check{}, usage, fmt.Errorf("validator's %s answer: %w", job.call, err)
		}
		return audit.CompareForward(claimed, replayed, job.call == protocol.CallForwardBackward, tol), usage, nil
	case protocol.CallSample:
		return a.replaySample(ctx, job, call, tol, &usage)
	case protocol.CallOptimStep:
		check, err := a.replayTrail(ctx, job, call, tol)
		return check, usage, err
	}
	return audit.Check{}, usage, fmt.Errorf("call %s: %w", job.call, errAuditInconclusive)
}

// replaySample scores the node's samples with one forward on the
// validator and, for greedy or seeded sampling (every sample the
// coordinator forwards is seeded: seedSample), compares them with the
// validator's own draws.
func (a *auditor) replaySample(ctx context.Context, job auditJob, call func(protocol.Call, any) (protocol.SessionResponse, error), tol audit.Tolerances, usage *protocol.Usage) (audit.Check, protocol.Usage, error) {
	var req protocol.SampleRequest
	if err := json.Unmarshal(job.body, &req); err != nil {
		return audit.Check{}, *usage, fmt.Errorf("sample request: %v: %w", err, errAuditInconclusive)
	}
	var claimed protocol.SampleResponse
	if err := json.Unmarshal(job.answer, &claimed); err != nil {
		return audit.Check{Reason: fmt.Sprintf("the node's answer does not decode: %v", err)}, *usage, nil
	}
	if shape := audit.CheckSampleShape(req, claimed); !shape.Passed {
		return shape, *usage, nil
	}
	prompts, err := a.promptTokens(job.model, req.Prompts)
	if err != nil {
		return audit.Check{}, *usage, err
	}
	resp, err := call(protocol.CallForward, audit.ScoreRequest(prompts, claimed))
	if err != nil {
		return audit.Check{}, *usage, fmt.Errorf("score the samples: %w", err)
	}
	var scored protocol.ForwardBackwardResponse
	if err := json.Unmarshal(resp.Body, &scored); err != nil {
		return audit.Check{}, *usage, fmt.Errorf("validator's scoring answer: %w", err)
	}
	check := audit.CompareScores(prompts, claimed, scored, tol)
	if !check.Passed || !audit.Redrawable(req.SamplingParams) {
		return check, *usage, nil
	}
	resp, err = call(protocol.CallSample, job.body)
	if err != nil {
		return audit.Check{}, *usage, fmt.Errorf("validator's own draw: %w", err)
	}
	var own protocol.SampleResponse
	if err := json.Unmarshal(resp.Body, &own); err != nil {
		return audit.Check{}, *usage, fmt.Errorf("validator's sample answer: %w", err)
	}
	drawn := audit.CompareDrawn(prompts, req.SamplingParams, claimed, own, scored, tol)
	drawn.Margin = max(drawn.Margin, check.Margin)
	drawn.Figures += check.Figures
	return drawn, *usage, nil
}

// promptTokens are a sample request's prompts as token ids: as sent, or
// text encoded as the node encodes it (trainer.EncodePrompt: the model's
// tokenizer with its special tokens) with this member's tokenizer. A
// member without it cannot score text prompts: the audit is inconclusive.
func (a *auditor) promptTokens(model ModelSpec, ps []protocol.Prompt) ([][]int, error) {
	out := make([][]int, len(ps))
	for i, p := range ps {
		if len(p.Tokens) > 0 {
			out[i] = p.Tokens
			continue
		}
		tk, err := a.c.tokenizers.get(model)
		if err != nil || tk == nil {
			return nil, fmt.Errorf("text prompts and no tokenizer for %s on this member: %w", model.Name, errAuditInconclusive)
		}
		out[i] = tk.Encode(p.Text, true)
	}
	return out, nil
}

// escrowLoop runs on the leader: every EscrowReleaseInterval it releases
// the earnings audits verified more than EscrowWindow ago.
func (c *Coordinator) escrowLoop(ctx context.Context) {
	if c.cfg.AuditRate <= 0 {
		return
	}
	// A new leader first resumes the audits its predecessor left.
	c.resumeAudits()
	every(ctx, c.cfg.EscrowReleaseInterval, func() {
		c.resumeAudits()
		c.auditor.pruneTrails()
		cutoff := time.Now().Add(-c.cfg.EscrowWindow).UnixMilli()
		var nodes []string
		c.fsm.read(func(s *State) { nodes = s.ReleasableNodes(cutoff) })
		if len(nodes) == 0 {
			return
		}
		v, err := c.propose(ctx, cmdReleaseEscrow, releaseEscrowCmd{Cutoff: cutoff, Nodes: nodes})
		if err != nil {
			c.log.Warn("release escrow", "category", "billing", "nodes", len(nodes), "err", err)
			return
		}
		c.log.Info("escrow released", "category", "billing", "nodes", len(nodes), "micro_credits", v)
	})
}
