package coordinator

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/signal-p2p/signal/coordinator/p2p"
	"github.com/signal-p2p/signal/internal/version"
	"github.com/signal-p2p/signal/protocol"
)

// Request limits named in 400 messages.
const (
	maxNameLen         = 200
	maxCredits         = 1 << 53 // keeps amounts exact in JSON clients that use doubles
	maxLoRARank        = 256
	maxLoRAAlpha       = 4096
	maxCheckpointEvery = 1_000_000
	maxBatchItems      = 4096
	maxPrompts         = 1024
	maxNumSamples      = 64
)

var allModules = []string{"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

func (c *Coordinator) handleHealth(*call) (any, error) {
	return protocol.Health{Status: "ok", Leader: c.IsLeader(), Version: version.Version}, nil
}

// ClusterStatus is the body of GET /v1/cluster.
type ClusterStatus struct {
	ID           string         `json:"id"`
	State        string         `json:"state"`
	LeaderID     string         `json:"leader_id"`
	Leader       bool           `json:"leader"`
	AppliedIndex uint64         `json:"applied_index"`
	Members      []MemberRecord `json:"members"`
}

func (c *Coordinator) handleCluster(*call) (any, error) {
	_, id := c.raft.LeaderWithID()
	st := ClusterStatus{ID: c.cfg.ID, State: c.raft.State().String(), LeaderID: string(id), Leader: c.IsLeader(), AppliedIndex: c.raft.AppliedIndex()}
	c.fsm.read(func(s *State) { st.Members = s.Members() })
	return st, nil
}

func (c *Coordinator) handleJoin(cl *call) (any, error) {
	var j joinRequest
	if err := decodeJSON(cl.body, &j, false); err != nil {
		return nil, err
	}
	if err := c.addMember(cl.r.Context(), j); err != nil {
		return nil, err
	}
	return map[string]string{"status": "joined"}, nil
}

func (c *Coordinator) handleRegisterNode(cl *call) (any, error) {
	var req registerNodeRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	op, err := c.registerNode(cl.r.Context(), req.PeerID, req.JoinToken)
	if err != nil {
		return nil, err
	}
	return registerNodeResponse{Operator: op}, nil
}

func (c *Coordinator) handleCreateKey(cl *call) (any, error) {
	var req protocol.CreateKeyRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if req.Credits < 0 || req.Credits > maxCredits {
		return nil, fmt.Errorf("field credits: %d out of range 0..%d: %w", req.Credits, int64(maxCredits), ErrInvalidRequest)
	}
	if len(req.Name) > maxNameLen {
		return nil, fmt.Errorf("field name: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	key := newSecret("sk-sig-")
	acct := "acct_" + newID(8)
	rec := KeyRecord{Hash: hashSecret(key), Account: acct, Name: req.Name, CreatedAt: now()}
	if _, err := c.propose(cl.r.Context(), cmdCreateKey, createKeyCmd{Key: rec, Credits: req.Credits}); err != nil {
		return nil, err
	}
	c.log.Info("api key created", "category", "security", "account", acct, "credits", req.Credits)
	return protocol.CreateKeyResponse{APIKey: key, Account: acct}, nil
}

func (c *Coordinator) handleCredit(cl *call) (any, error) {
	var req protocol.CreditRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if req.Account == "" {
		return nil, fmt.Errorf("field account: required: %w", ErrInvalidRequest)
	}
	if req.Amount <= 0 || req.Amount > maxCredits {
		return nil, fmt.Errorf("field amount: %d out of range 1..%d: %w", req.Amount, int64(maxCredits), ErrInvalidRequest)
	}
	v, err := c.propose(cl.r.Context(), cmdMint, mintCmd{Account: req.Account, Amount: req.Amount, Idem: cl.idem, Time: now()})
	if err != nil {
		return nil, err
	}
	rec := v.(IdemRecord)
	c.log.Info("account credited", "category", "billing", "account", req.Account, "amount", req.Amount)
	return rawResponse{status: rec.Status, body: rec.Body, recorded: true}, nil
}

func (c *Coordinator) handleJoinToken(cl *call) (any, error) {
	var req protocol.JoinTokenRequest
	if err := decodeJSON(cl.body, &req, true); err != nil {
		return nil, err
	}
	if len(req.OperatorAccount) > maxNameLen {
		return nil, fmt.Errorf("field operator_account: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	op := req.OperatorAccount
	if op == "" {
		op = "op_" + newID(8)
	}
	tok := newSecret("jt-")
	if _, err := c.propose(cl.r.Context(), cmdCreateJoinToken, JoinTokenRecord{Hash: hashSecret(tok), Operator: op, CreatedAt: now()}); err != nil {
		return nil, err
	}
	return protocol.JoinTokenResponse{JoinToken: tok, OperatorAccount: op}, nil
}

func (c *Coordinator) handleModels(*call) (any, error) { return c.models.list(), nil }

func (c *Coordinator) handleNodes(*call) (any, error) {
	nodes := c.nodesBackend().Nodes()
	out := protocol.NodeList{Nodes: make([]protocol.Node, 0, len(nodes))}
	for _, n := range nodes {
		if c.IsJoined(n.PeerID) {
			out.Nodes = append(out.Nodes, n)
		}
	}
	return out, nil
}

func (c *Coordinator) handleAccount(cl *call) (any, error) {
	var a protocol.Account
	c.fsm.read(func(s *State) { a = s.AccountView(cl.account) })
	return a, nil
}

var tokenizers sync.Map // model path -> Tokenizer

// tokenizer returns a model's tokenizer, loaded once per path; nil when this
// coordinator has none for it.
func (c *Coordinator) tokenizer(m ModelSpec) (Tokenizer, error) {
	if c.cfg.LoadTokenizer == nil || m.Path == "" {
		return nil, nil
	}
	if t, ok := tokenizers.Load(m.Path); ok {
		return t.(Tokenizer), nil
	}
	tk, err := c.cfg.LoadTokenizer(m.Path)
	if err != nil {
		return nil, fmt.Errorf("load tokenizer for %s: %w", m.Name, err)
	}
	t, _ := tokenizers.LoadOrStore(m.Path, tk)
	return t.(Tokenizer), nil
}

// textCounter counts texts with the model's tokenizer where this member has
// it, so text examples are billed by their tokens, not bounded by bytes.
func (c *Coordinator) textCounter(m ModelSpec) textCounter {
	t, err := c.tokenizer(m)
	if err != nil || t == nil {
		return nil
	}
	return func(text string) int64 { return int64(len(t.Encode(text, false))) }
}

// maxTokenizeBytes bounds one /v1/tokenize text: the leader tokenizes it
// in memory, and a context's worth of text is far below this.
const maxTokenizeBytes = 1 << 20

func (c *Coordinator) handleTokenize(cl *call) (any, error) {
	var req protocol.TokenizeRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if len(req.Text) > maxTokenizeBytes {
		return nil, fmt.Errorf("field text: %d bytes, at most %d; split it into several calls: %w", len(req.Text), maxTokenizeBytes, ErrInvalidRequest)
	}
	m, err := c.models.get(req.BaseModel)
	if err != nil {
		return nil, err
	}
	t, err := c.tokenizer(m)
	if err != nil {
		return nil, err
	}
	if t == nil {
		return nil, retryAfter(fmt.Errorf("no tokenizer for model %s on this coordinator: %w", m.Name, ErrUnavailable), c.cfg.RetryAfter)
	}
	select {
	case c.tokenizeSlots <- struct{}{}:
		defer func() { <-c.tokenizeSlots }()
	case <-cl.r.Context().Done():
		return nil, fmt.Errorf("client gone while waiting to tokenize: %w", cl.r.Context().Err())
	}
	toks := t.Encode(req.Text, req.AddSpecialTokens)
	if toks == nil {
		toks = []int{}
	}
	return protocol.TokenizeResponse{Tokens: toks}, nil
}

// ---- runs ----

func (c *Coordinator) handleListRuns(cl *call) (any, error) {
	out := protocol.RunList{Runs: []protocol.Run{}}
	c.fsm.read(func(s *State) {
		for _, r := range s.RunsOf(cl.account) {
			out.Runs = append(out.Runs, r.Run)
		}
	})
	return out, nil
}

// ownedRun returns the caller's run named in the path.
func (c *Coordinator) ownedRun(cl *call) (*RunRecord, error) {
	id := cl.r.PathValue("id")
	var rec *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { rec, ok = s.Run(id) })
	if !ok {
		return nil, fmt.Errorf("run %q: %w", id, ErrNotFound)
	}
	if rec.Owner != cl.account {
		return nil, fmt.Errorf("run %q belongs to another account: %w", id, ErrForbidden)
	}
	return rec, nil
}

func (c *Coordinator) handleGetRun(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	return rec.Run, nil
}

func (c *Coordinator) handleRunMetrics(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	return protocol.MetricsResponse{Metrics: append([]protocol.Metrics{}, rec.Metrics...)}, nil
}

func (c *Coordinator) handleCreateRun(cl *call) (any, error) {
	var req protocol.CreateRunRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	spec, model, err := c.validateCreateRun(&req)
	if err != nil {
		return nil, err
	}
	ctx := cl.r.Context()
	// Refuse before recording a run that could not be placed anywhere.
	if _, err := c.place(model, nil); err != nil {
		var open int
		c.fsm.read(func(s *State) {
			for _, r := range s.RunsOf(cl.account) {
				if isActive(r.Run.Status) {
					open++
				}
			}
		})
		if open > 0 {
			err = fmt.Errorf("%w; you hold %d open runs (DELETE /v1/runs/{id} frees one)", err, open)
		}
		return nil, retryAfter(err, c.cfg.RetryAfter)
	}
	spec.RunID = "run_" + newID(8)
	rec := RunRecord{
		Run: protocol.Run{ID: spec.RunID, Name: req.Name, BaseModel: spec.BaseModel, LoRARank: spec.LoRARank,
			LoRAAlpha: spec.LoRAAlpha, TargetModules: spec.TargetModules, Status: protocol.RunStarting,
			CheckpointEvery: spec.CheckpointEvery, CreatedAt: now()},
		Owner: cl.account, Seed: spec.Seed, LRSchedule: spec.LRSchedule, LastActive: now(),
	}
	if _, err := c.propose(ctx, cmdCreateRunLimited, createRunLimitedCmd{Run: rec, MaxActive: c.cfg.MaxRunsPerAccount, MinAvailable: c.cfg.MinRunBalance}); err != nil {
		if errors.Is(err, ErrTooManyRuns) {
			err = retryAfter(err, c.cfg.RetryAfter)
		}
		return nil, err
	}
	run, err := c.openSession(ctx, spec, model, nil, false, map[string]bool{})
	if err != nil {
		// The run exists; record why it has no session.
		_, _ = c.propose(context.WithoutCancel(ctx), cmdUpdateRun, RunUpdate{RunID: spec.RunID, Status: protocol.RunFailed, Time: now()})
		return nil, err
	}
	return created{run.Run}, nil
}

// openSession places spec on a node (not in exclude), sends init and marks
// the run ready there. It tries further nodes when one is lost.
// When moved is set the run restarts at the checkpoint's step (0 without
// one) and records it as resumed_from_step.
func (c *Coordinator) openSession(ctx context.Context, spec protocol.SessionSpec, model ModelSpec, resume *protocol.Checkpoint, moved bool, exclude map[string]bool) (*RunRecord, error) {
	spec.ResumeFrom = resume
	body, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		node, err := c.place(model, exclude)
		if err != nil {
			if lastErr != nil {
				err = fmt.Errorf("%w (last node error: %v)", err, lastErr)
			}
			return nil, retryAfter(err, c.cfg.RetryAfter)
		}
		peer := node.PeerID
		if _, err := c.propose(ctx, cmdUpdateRun, RunUpdate{RunID: spec.RunID, Node: &peer, Time: now()}); err != nil {
			return nil, err
		}
		resp, err := c.nodesBackend().Do(ctx, peer, protocol.SessionRequest{RequestID: spec.RunID + "/init/" + newID(4), RunID: spec.RunID, Call: protocol.CallInit, Body: body})
		if err == nil && resp.Error != nil {
			err = nodeError(resp.Error)
			if !errors.Is(err, ErrUnavailable) {
				return nil, err
			}
		}
		if err != nil {
			if errors.Is(err, ErrNodeLost) || errors.Is(err, ErrUnavailable) {
				exclude[peer] = true
				lastErr = err
				continue
			}
			return nil, fmt.Errorf("init run %s on %s: %w", spec.RunID, peer, err)
		}
		u := RunUpdate{RunID: spec.RunID, Status: protocol.RunReady, Time: now()}
		if moved {
			step := 0
			if resume != nil {
				step = resume.Step
			}
			u.Step, u.ResumedFromStep = &step, &step
			u.ExpectStatus = []string{protocol.RunMoving}
		}
		v, err := c.propose(ctx, cmdUpdateRun, u)
		if err != nil {
			return nil, err
		}
		return v.(*RunRecord), nil
	}
	return nil, retryAfter(fmt.Errorf("no node could open run %s: %v: %w", spec.RunID, lastErr, ErrNoCapacity), c.cfg.RetryAfter)
}

func (c *Coordinator) validateCreateRun(req *protocol.CreateRunRequest) (protocol.SessionSpec, ModelSpec, error) {
	var spec protocol.SessionSpec
	if req.BaseModel == "" {
		return spec, ModelSpec{}, fmt.Errorf("field base_model: required: %w", ErrInvalidRequest)
	}
	model, err := c.models.get(req.BaseModel)
	if err != nil {
		return spec, model, err
	}
	spec.BaseModel = model.Name
	spec.LoRARank = 32
	if req.LoRARank != nil {
		spec.LoRARank = *req.LoRARank
	}
	if spec.LoRARank < 1 || spec.LoRARank > maxLoRARank {
		return spec, model, fmt.Errorf("field lora_rank: %d out of range 1..%d: %w", spec.LoRARank, maxLoRARank, ErrInvalidRequest)
	}
	spec.LoRAAlpha = 32
	if req.LoRAAlpha != nil {
		spec.LoRAAlpha = *req.LoRAAlpha
	}
	if !(spec.LoRAAlpha > 0 && spec.LoRAAlpha <= maxLoRAAlpha) {
		return spec, model, fmt.Errorf("field lora_alpha: %v out of range (0, %d]: %w", spec.LoRAAlpha, maxLoRAAlpha, ErrInvalidRequest)
	}
	spec.TargetModules = allModules
	if len(req.TargetModules) > 0 {
		valid := map[string]bool{"all-linear": true}
		for _, m := range allModules {
			valid[m] = true
		}
		for _, m := range req.TargetModules {
			if !valid[m] {
				return spec, model, fmt.Errorf("field target_modules: %q is not one of %v or all-linear: %w", m, allModules, ErrInvalidRequest)
			}
		}
		spec.TargetModules = req.TargetModules
	}
	spec.CheckpointEvery = 10
	if req.CheckpointEvery != nil {
		spec.CheckpointEvery = *req.CheckpointEvery
	}
	if spec.CheckpointEvery < 0 || spec.CheckpointEvery > maxCheckpointEvery {
		return spec, model, fmt.Errorf("field checkpoint_every: %d out of range 0..%d (0 = never): %w", spec.CheckpointEvery, maxCheckpointEvery, ErrInvalidRequest)
	}
	if req.Seed != nil {
		spec.Seed = *req.Seed
	} else {
		var b [8]byte
		_, _ = rand.Read(b[:])
		spec.Seed = int64(binary.BigEndian.Uint64(b[:]) >> 1)
	}
	if len(req.Name) > maxNameLen {
		return spec, model, fmt.Errorf("field name: longer than %d characters: %w", maxNameLen, ErrInvalidRequest)
	}
	if s := req.LRSchedule; s != nil {
		switch {
		case s.Kind != "constant" && s.Kind != "linear" && s.Kind != "cosine":
			return spec, model, fmt.Errorf("field lr_schedule.kind: %q is not constant, linear or cosine: %w", s.Kind, ErrInvalidRequest)
		case !(s.PeakLR > 0 && s.PeakLR <= 10):
			return spec, model, fmt.Errorf("field lr_schedule.peak_lr: %v out of range (0, 10]: %w", s.PeakLR, ErrInvalidRequest)
		case s.WarmupSteps < 0 || s.TotalSteps < 0:
			return spec, model, fmt.Errorf("field lr_schedule: warmup_steps and total_steps must not be negative: %w", ErrInvalidRequest)
		case !(s.FinalFraction >= 0 && s.FinalFraction <= 1):
			return spec, model, fmt.Errorf("field lr_schedule.final_fraction: %v out of range [0, 1]: %w", s.FinalFraction, ErrInvalidRequest)
		}
		spec.LRSchedule, _ = json.Marshal(s)
	}
	return spec, model, nil
}

func (c *Coordinator) handleEndRun(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	if rec.Run.Status == protocol.RunEnded {
		return rec.Run, nil
	}
	if rec.Run.Node != "" && rec.Run.Status != protocol.RunFailed {
		resp, err := c.nodesBackend().Do(cl.r.Context(), rec.Run.Node, protocol.SessionRequest{RequestID: rec.Run.ID + "/close", RunID: rec.Run.ID, Call: protocol.CallClose})
		// A lost node has no session left to free; the run ends anyway.
		if err != nil && !errors.Is(err, ErrNodeLost) {
			return nil, fmt.Errorf("close run %s on %s: %w", rec.Run.ID, rec.Run.Node, err)
		}
		if err == nil && resp.Error != nil && resp.Error.Code != protocol.CodeNotFound {
			return nil, nodeError(resp.Error)
		}
	}
	v, err := c.propose(cl.r.Context(), cmdUpdateRun, RunUpdate{RunID: rec.Run.ID, Status: protocol.RunEnded, Time: now()})
	if err != nil {
		return nil, err
	}
	return v.(*RunRecord).Run, nil
}

func (c *Coordinator) handleLoadState(cl *call) (any, error) {
	rec, err := c.ownedRun(cl)
	if err != nil {
		return nil, err
	}
	if err := runUsable(rec, c.cfg.RetryAfter); err != nil {
		return nil, err
	}
	var req protocol.LoadStateRequest
	if err := decodeJSON(cl.body, &req, false); err != nil {
		return nil, err
	}
	if req.Checkpoint == "" {
		return nil, fmt.Errorf("field checkpoint: required (an id, URI or CID): %w", ErrInvalidRequest)
	}
	var cp protocol.Checkpoint
	var src *RunRecord
	var ok bool
	c.fsm.read(func(s *State) { cp, src, ok = s.OwnedCheckpoint(cl.account, req.Checkpoint) })
	if !ok {
		return nil, fmt.Errorf("field checkpoint: %q is not a checkpoint of your runs (GET /v1/runs/{id} lists them by id): %w", req.Checkpoint, ErrNotFound)
	}
	if src.Run.BaseModel != rec.Run.BaseModel || src.Run.LoRARank != rec.Run.LoRARank || !slices.Equal(src.Run.TargetModules, rec.Run.TargetModules) {
		return nil, fmt.Errorf("field checkpoint: %s holds a %s adapter of rank %d on %v, run %s is %s rank %d on %v; create a run with the checkpoint's settings to load it: %w",
			cp.ID, src.Run.BaseModel, src.Run.LoRARank, src.Run.TargetModules, rec.Run.ID, rec.Run.BaseModel, rec.Run.LoRARank, rec.Run.TargetModules, ErrInvalidRequest)
	}
	// The node gets the recorded reference, never the caller's string.
	req.Checkpoint = cp.URI
	if req.Checkpoint == "" {
		req.Checkpoint = cp.ID
	}
	body, _ := json.Marshal(req)
	resp, err := c.doRun(cl.r.Context(), cl, rec, protocol.CallLoadState, body)
	if err != nil {
		return nil, err
	}
	var out struct {
		Step *int `json:"step"`
	}
	_ = json.Unmarshal(resp.Body, &out)
	u := RunUpdate{RunID: rec.Run.ID, Step: out.Step, Time: now()}
	v, err := c.propose(cl.r.Context(), cmdUpdateRun, u)
	if err != nil {
		return nil, err
	}
	return v.(*RunRecord).Run, nil
}

// runUsable refuses calls on runs that have no ready session.
func runUsable(rec *RunRecord, retry time.Duration) error {
	switch rec.Run.Status {
	case protocol.RunReady:
		return nil
	case protocol.RunStarting, protocol.RunMoving:
		return retryAfter(fmt.Errorf("run %s is %s: %w", rec.Run.ID, rec.Run.Status, ErrUnavailable), retry)
	default:
		return fmt.Errorf("run %s is %s: %w", rec.Run.ID, rec.Run.Status, ErrConflict)
	}
}

// requestID is the node-side idempotency id: derived from the client's
// Idempotency-Key when there is one, so a retry through a new leader is
// executed once by the node too.
func requestID(cl *call) string {
	if cl.idem != nil {
		h := sha256.Sum256([]byte(cl.idem.Scope + "\x00" + cl.idem.BodyHash))
		return hex.EncodeToString(h[:16])
	}
	return newID(16)
}

// doRun sends one call to the run's node; a lost node starts the run's move
// and answers 503.
func (c *Coordinator) doRun(ctx context.Context, cl *call, rec *RunRecord, callName protocol.Call, body []byte) (protocol.SessionResponse, error) {
	resp, err := c.nodesBackend().Do(ctx, rec.Run.Node, protocol.SessionRequest{RequestID: requestID(cl), RunID: rec.Run.ID, Call: callName, Body: body})
	if err != nil {
		if errors.Is(err, ErrNodeLost) {
			c.markLost(rec.Run.ID, rec.Run.Node)
			return resp, retryAfter(fmt.Errorf("run %s: node %s lost; the run is moving: %w", rec.Run.ID, rec.Run.Node, err), c.cfg.RetryAfter)
		}
		if errors.Is(err, p2p.ErrResponseTooLarge) {
			return resp, fmt.Errorf("the answer to %s is larger than a node may send (%v); send fewer items or tokens per call: %w", callName, err, ErrTooLarge)
		}
		if errors.Is(err, p2p.ErrBadResponse) {
			return resp, fmt.Errorf("run %s call %s: %v: %w", rec.Run.ID, callName, err, ErrBadNodeAnswer)
		}
		return resp, fmt.Errorf("run %s call %s: %w", rec.Run.ID, callName, err)
	}
	if resp.Error != nil {
		return resp, nodeError(resp.Error)
	}
	return resp, nil
}

// billed returns the handler of a billed session call: quote the call from
// its request, hold the quote through raft, run it on the node, and charge
// what the coordinator counts (never above the quote) in one entry that
// also releases the hold.
func (c *Coordinator) billed(callName protocol.Call) handlerFunc {
	return func(cl *call) (any, error) {
		rec, err := c.ownedRun(cl)
		if err != nil {
			return nil, err
		}
		if err := runUsable(rec, c.cfg.RetryAfter); err != nil {
			return nil, err
		}
		model, err := c.models.get(rec.Run.BaseModel)
		if err != nil {
			return nil, err
		}
		q, err := quoteCall(callName, cl.body, model, rec.Run, c.textCounter(model))
		if err != nil {
			return nil, err
		}
		ctx := cl.r.Context()
		// A call quoted at nothing (an optim_step without a checkpoint)
		// holds nothing: no raft entry for it on the call path.
		var hold HoldRecord
		if q.credits > 0 {
			hold = HoldRecord{ID: "hold_" + newID(8), Account: cl.account, Amount: q.credits, Holder: c.cfg.ID, Time: now()}
			if _, err := c.propose(ctx, cmdHold, hold); err != nil {
				return nil, err
			}
		}
		// From here the call is the coordinator's to finish: a client that
		// hangs up does not make work done free, nor leave the hold behind.
		work, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.cfg.CallTimeout)
		defer cancel()
		release := func() {
			if hold.ID == "" {
				return
			}
			if _, err := c.propose(work, cmdReleaseHolds, releaseHoldsCmd{IDs: []string{hold.ID}}); err != nil {
				c.log.Warn("release hold", "category", "billing", "hold", hold.ID, "err", err)
			}
		}
		// Wait for the run's earlier calls; a client that leaves meanwhile
		// takes its call with it, before any node sees it.
		done, err := c.gates.acquire(ctx, rec.Run.ID)
		if err != nil {
			release()
			return nil, fmt.Errorf("client gone before the call started: %w", err)
		}
		defer done()
		// The run as the earlier calls left it (step, node, status).
		if rec, err = c.ownedRun(cl); err == nil {
			err = runUsable(rec, c.cfg.RetryAfter)
		}
		if err != nil {
			release()
			return nil, err
		}
		body := cl.body
		if len(body) == 0 {
			body = []byte("{}")
		}
		resp, err := c.doRun(work, cl, rec, callName, body)
		if err != nil {
			release()
			return nil, err
		}
		usage := q.settle(resp.Usage)
		cost := priceUsage(model.Prices, usage)
		cost.Credits = min(cost.Credits, q.credits)
		update, err := c.runUpdateFor(rec.Run, callName, resp)
		if err != nil {
			release()
			return nil, err
		}
		respBody := resp.Body
		if len(respBody) == 0 {
			respBody = json.RawMessage("{}")
		}
		var operator string
		c.fsm.read(func(s *State) {
			if n, ok := s.Node(rec.Run.Node); ok {
				operator = n.Operator
			}
		})
		v, err := c.propose(work, cmdCharge, chargeCmd{
			Account: cl.account, Operator: operator, FeeBPS: c.cfg.FeeBasisPoints, Cost: cost,
			RunID: rec.Run.ID, Call: string(callName), Time: now(), Idem: cl.idem, Body: respBody, RunUpdate: &update,
			HoldID: hold.ID,
		})
		if err != nil {
			return nil, err
		}
		res := v.(ChargeResult)
		if !res.Replayed {
			c.metrics.charges.Inc()
			c.metrics.credits.Add(float64(res.Cost.Credits))
		}
		if ctx.Err() != nil {
			c.log.Info("call finished and charged after the client left", "category", "billing", "run", rec.Run.ID, "call", callName, "credits", res.Cost.Credits)
		}
		return rawResponse{status: res.Status, body: res.Body, recorded: true, replayed: res.Replayed}, nil
	}
}

// runUpdateFor extracts what the run record keeps from a call's answer.
// A node is a stranger, so a checkpoint is recorded only from the calls
// that make one (save_state; optim_step's automatic full checkpoint), for
// this run at the step the call leaves it, and inside the network's store:
// anything else is refused (save_state) or dropped (optim_step), never
// written into the run for a later move to fetch.
func (c *Coordinator) runUpdateFor(run protocol.Run, callName protocol.Call, resp protocol.SessionResponse) (RunUpdate, error) {
	u := RunUpdate{RunID: run.ID, Time: now()}
	switch callName {
	case protocol.CallForwardBackward:
		var fb struct {
			LossSum  float64 `json:"loss_sum"`
			LossMean float64 `json:"loss_mean"`
			Tokens   int64   `json:"tokens"`
		}
		if err := json.Unmarshal(resp.Body, &fb); err != nil {
			return u, fmt.Errorf("node forward_backward answer: %v: %w", err, ErrBadNodeAnswer)
		}
		u.Loss, u.Tokens = &fb.LossSum, fb.Tokens
		w := lossWeight(fb.LossSum, fb.LossMean)
		u.Weight = &w
	case protocol.CallOptimStep:
		var os protocol.OptimStepResponse
		if err := json.Unmarshal(resp.Body, &os); err != nil {
			return u, fmt.Errorf("node optim_step answer: %v: %w", err, ErrBadNodeAnswer)
		}
		u.Optim = &OptimFigures{Step: os.Step, LearningRate: os.LearningRate, GradNorm: os.GradNorm}
		if cp := resp.Checkpoint; cp != nil {
			if err := c.checkCheckpoint(run, *cp, os.Step, "full"); err != nil {
				c.log.Warn("node's automatic checkpoint dropped", "category", "security", "run", run.ID, "node", run.Node, "err", err)
			} else {
				stamped := *cp
				stamped.CreatedAt = u.Time
				u.Checkpoint = &stamped
			}
		}
	case protocol.CallSaveState:
		cp := resp.Checkpoint
		if cp == nil {
			var ss protocol.SaveStateResponse
			if err := json.Unmarshal(resp.Body, &ss); err == nil && ss.Checkpoint.ID != "" {
				cp = &ss.Checkpoint
			}
		}
		if cp == nil {
			return u, fmt.Errorf("node save_state answer: no checkpoint: %w", ErrBadNodeAnswer)
		}
		if err := c.checkCheckpoint(run, *cp, run.Step, ""); err != nil {
			return u, err
		}
		stamped := *cp
		stamped.CreatedAt = u.Time // storage is billed by the coordinator's clock
		u.Checkpoint = &stamped
	}
	return u, nil
}

// checkCheckpoint says whether a node's checkpoint may be recorded in run:
// its run, step and mode (empty: adapter or full) and every URI inside
// the network's store.
func (c *Coordinator) checkCheckpoint(run protocol.Run, cp protocol.Checkpoint, step int, mode string) error {
	switch {
	case cp.ID == "" || len(cp.ID) > maxNameLen:
		return fmt.Errorf("node checkpoint: id %q: %w", cp.ID, ErrBadNodeAnswer)
	case cp.RunID != run.ID:
		return fmt.Errorf("node checkpoint %s: for run %q, not %s: %w", cp.ID, cp.RunID, run.ID, ErrBadNodeAnswer)
	case cp.Step != step && cp.Step != step+1:
		// step+1: an optim_step that ran beside a save_state.
		return fmt.Errorf("node checkpoint %s: step %d, the run is at %d: %w", cp.ID, cp.Step, step, ErrBadNodeAnswer)
	case mode != "" && cp.Mode != mode, cp.Mode != "adapter" && cp.Mode != "full":
		return fmt.Errorf("node checkpoint %s: mode %q: %w", cp.ID, cp.Mode, ErrBadNodeAnswer)
	}
	uris := []string{cp.URI}
	for _, f := range cp.Files {
		uris = append(uris, f.URI)
	}
	for _, u := range uris {
		if !c.inStore(u) {
			return fmt.Errorf("node checkpoint %s: URI %q is outside the network's store %v: %w", cp.ID, u, c.cfg.CheckpointStores, ErrBadNodeAnswer)
		}
	}
	return nil
}

// inStore says whether uri names an object inside one of the network's
// checkpoint stores. With none configured (a development cluster) only
// plain file and s3 URIs pass: never one that names its own endpoint.
func (c *Coordinator) inStore(uri string) bool {
	if len(c.cfg.CheckpointStores) == 0 {
		u, err := url.Parse(uri)
		return err == nil && (u.Scheme == "file" || u.Scheme == "s3") && u.RawQuery == "" && !strings.Contains(u.Path, "/../")
	}
	for _, prefix := range c.cfg.CheckpointStores {
		if strings.HasPrefix(uri, strings.TrimRight(prefix, "/")+"/") && !strings.Contains(uri[len(prefix):], "..") {
			return true
		}
	}
	return false
}

// lossWeight is the sum of a forward_backward's loss weights, which the
// node's answer carries as loss_sum / loss_mean. Tokens would count the
// weight-0 prompt tokens too and understate the mean. A zero mean means a
// zero sum as well, so the call adds nothing to the step's loss and its
// weight cannot be known: it counts 0.
func lossWeight(lossSum, lossMean float64) float64 {
	if lossMean == 0 || math.IsNaN(lossMean) || math.IsInf(lossMean, 0) {
		return 0
	}
	w := lossSum / lossMean
	if !(w > 0) || math.IsInf(w, 0) {
		return 0
	}
	return w
}

// perThousand is ceil(n × price / 1000) without overflow, saturating.
func perThousand(n, price int64) int64 {
	if n <= 0 || price <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(n), uint64(price))
	if hi >= 1000 {
		return math.MaxInt64
	}
	q, r := bits.Div64(hi, lo, 1000)
	if r > 0 {
		q++
	}
	if q > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(q)
}

func satAdd(a, b int64) int64 {
	if a > math.MaxInt64-b {
		return math.MaxInt64
	}
	return a + b
}

// bytesPerGB is the storage price's unit.
const bytesPerGB = 1_000_000_000

// priceUsage is a call's exact cost. Checkpoint storage is charged for its
// first hour when written.
func priceUsage(p protocol.Prices, u protocol.Usage) protocol.Cost {
	credits := satAdd(satAdd(perThousand(u.TrainTokens, p.TrainPer1K), perThousand(u.PrefillTokens, p.PrefillPer1K)), perThousand(u.SampledTokens, p.SamplePer1K))
	if u.StoredBytes > 0 && p.StoragePerGBHour > 0 {
		credits = satAdd(credits, perThousand(u.StoredBytes, p.StoragePerGBHour)/(bytesPerGB/1000)+1)
	}
	return protocol.Cost{Credits: credits, TrainTokens: u.TrainTokens, PrefillTokens: u.PrefillTokens, SampledTokens: u.SampledTokens}
}

// markLost asks the failover loop to move a run off node now. node is the
// node the failed call went to: by the time the call fails the run may have
// moved already, and the loop then ignores the mark.
func (c *Coordinator) markLost(runID, node string) {
	c.movingMu.Lock()
	c.missing[runID] = lostMark{node: node}
	c.movingMu.Unlock()
}
