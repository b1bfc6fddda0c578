package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"

	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
	"github.com/signal-p2p/signal/trainer"
)

// Checkpoint modes.
const (
	ModeAdapter = "adapter"
	ModeFull    = "full"
)

// ManagerConfig configures a session Manager.
type ManagerConfig struct {
	// MaxSessions bounds open sessions; an init beyond it is refused (503).
	MaxSessions int
	// Storage is where checkpoints go and CIDs are looked up.
	Storage storage.Store
	// TempDir holds checkpoint files between the engine and storage ("" = os.TempDir()).
	TempDir string
	// IdemEntries bounds the remembered request ids.
	IdemEntries int
	Logger      *slog.Logger
}

// Manager owns the sessions of one node: it dispatches session calls to
// the engine, answers repeated request ids from memory, uploads
// checkpoints and takes the automatic ones.
type Manager struct {
	cfg    ManagerConfig
	engine Engine
	res    storage.Resolver
	idem   *idemCache
	log    *slog.Logger

	mu       sync.Mutex
	runs     map[string]*run
	closing  bool
	inflight sync.WaitGroup
}

// run is one open session; its mutex orders the run's calls.
type run struct {
	mu     sync.Mutex
	spec   protocol.SessionSpec
	sess   Session
	closed bool
}

// NewManager returns a Manager over engine.
func NewManager(cfg ManagerConfig, engine Engine) *Manager {
	if cfg.IdemEntries <= 0 {
		cfg.IdemEntries = 4096
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Manager{
		cfg:    cfg,
		engine: engine,
		res:    storage.Resolver{Default: cfg.Storage},
		idem:   newIdemCache(cfg.IdemEntries),
		log:    cfg.Logger,
		runs:   make(map[string]*run),
	}
}

// Sessions is the number of open sessions.
func (m *Manager) Sessions() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.runs)
}

// Handle executes one session call and returns its response; a request id
// seen before is answered with the first response without running again.
func (m *Manager) Handle(ctx context.Context, req protocol.SessionRequest) protocol.SessionResponse {
	if err := req.Validate(); err != nil {
		return errorResponse(req.RequestID, fmt.Errorf("%w: %w", ErrInvalidRequest, err))
	}
	e, owner := m.idem.begin(req.RequestID)
	if !owner {
		resp, err := e.wait(ctx)
		if err != nil {
			return errorResponse(req.RequestID, fmt.Errorf("%w: waiting for the first attempt: %w", ErrUnavailable, err))
		}
		return resp
	}
	resp := m.execute(ctx, req)
	resp.RequestID = req.RequestID
	m.idem.finish(req.RequestID, e, resp)
	return resp
}

func (m *Manager) execute(ctx context.Context, req protocol.SessionRequest) protocol.SessionResponse {
	m.mu.Lock()
	if m.closing {
		m.mu.Unlock()
		return errorResponse(req.RequestID, protocol.UserErrorf(ErrUnavailable, "the node is shutting down; the run moves to another node"))
	}
	m.inflight.Add(1)
	m.mu.Unlock()
	defer m.inflight.Done()

	var (
		resp protocol.SessionResponse
		err  error
	)
	switch req.Call {
	case protocol.CallInit:
		resp, err = m.init(ctx, req)
	case protocol.CallClose:
		resp, err = m.closeRun(req)
	default:
		resp, err = m.onRun(ctx, req)
	}
	if err != nil {
		m.log.Info("session call failed", "run", req.RunID, "call", req.Call, "request", req.RequestID, "err", err)
		return errorResponse(req.RequestID, err)
	}
	return resp
}

func (m *Manager) init(ctx context.Context, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	var spec protocol.SessionSpec
	if err := json.Unmarshal(req.Body, &spec); err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("%w: init body: %w", ErrInvalidRequest, err)
	}
	if spec.RunID == "" {
		spec.RunID = req.RunID
	}
	if spec.RunID != req.RunID {
		return protocol.SessionResponse{}, fmt.Errorf("%w: run_id: body says %q, request says %q", ErrInvalidRequest, spec.RunID, req.RunID)
	}
	if spec.BaseModel == "" {
		return protocol.SessionResponse{}, fmt.Errorf("%w: base_model: missing", ErrInvalidRequest)
	}
	if spec.CheckpointEvery < 0 {
		return protocol.SessionResponse{}, fmt.Errorf("%w: checkpoint_every: %d, must be ≥ 0", ErrInvalidRequest, spec.CheckpointEvery)
	}

	m.mu.Lock()
	if r, ok := m.runs[req.RunID]; ok {
		m.mu.Unlock()
		return m.reinit(r, spec)
	}
	if m.cfg.MaxSessions > 0 && len(m.runs) >= m.cfg.MaxSessions {
		m.mu.Unlock()
		return protocol.SessionResponse{}, protocol.UserErrorf(ErrUnavailable, "the node is full: %d of %d sessions open", len(m.runs), m.cfg.MaxSessions)
	}
	// Reserve the slot with the run locked, so that concurrent calls for
	// it wait until it is open (or fail with unknown run if it is not).
	r := &run{spec: spec}
	r.mu.Lock()
	m.runs[req.RunID] = r
	m.mu.Unlock()
	defer r.mu.Unlock()

	var err error
	fail := func(err error) (protocol.SessionResponse, error) {
		r.closed = true
		m.mu.Lock()
		delete(m.runs, req.RunID)
		m.mu.Unlock()
		return protocol.SessionResponse{}, err
	}
	var sess Session
	if spec.RandomModel != nil {
		sess, err = m.openRandom(ctx, spec)
	} else {
		sess, err = m.engine.Open(ctx, spec)
	}
	if errors.Is(err, ErrUnknownModel) {
		return fail(&protocol.UserError{Msg: fmt.Sprintf("this node does not serve base_model %q (it serves %s)",
			spec.BaseModel, strings.Join(m.engine.Models(), ", ")), Err: err})
	}
	if err != nil {
		return fail(fmt.Errorf("open session: %w", err))
	}
	r.sess = sess
	state := protocol.SessionState{RunID: req.RunID, Backend: m.engine.Backend()}
	if spec.ResumeFrom != nil {
		ref := spec.ResumeFrom.URI
		if ref == "" {
			ref = spec.ResumeFrom.ID
		}
		if err := m.load(ctx, sess, ref, false); err != nil {
			_ = sess.Close()
			return fail(err)
		}
		step := sess.Step()
		state.ResumedFromStep = &step
	}
	state.Step = sess.Step()
	m.log.Info("session opened", "run", req.RunID, "model", spec.BaseModel, "step", state.Step)
	return bodyResponse(state, protocol.Usage{}, nil)
}

// Bounds on a challenge's random model: small, so that generating it takes
// a moment and holding it a few hundred MB at most.
const (
	maxRandomModelParams = 64 << 20
	maxRandomModelDim    = 8192
	maxRandomModelVocab  = 1 << 18
)

// openRandom generates spec's random model in a directory of its own and
// opens the session on it; closing the session deletes the directory.
func (m *Manager) openRandom(ctx context.Context, spec protocol.SessionSpec) (Session, error) {
	rm := *spec.RandomModel
	for _, d := range []struct {
		name    string
		v, most int
	}{{"hidden_size", rm.HiddenSize, maxRandomModelDim}, {"intermediate_size", rm.IntermediateSize, maxRandomModelDim},
		{"num_hidden_layers", rm.Layers, maxRandomModelDim}, {"num_attention_heads", rm.Heads, maxRandomModelDim},
		{"num_key_value_heads", rm.KVHeads, maxRandomModelDim}, {"vocab_size", rm.VocabSize, maxRandomModelVocab},
		{"max_position_embeddings", rm.Context, maxRandomModelDim}} {
		if d.v <= 0 || d.v > d.most {
			return nil, protocol.UserErrorf(ErrInvalidRequest, "random_model.%s %d: want 1..%d", d.name, d.v, d.most)
		}
	}
	if p := rm.Params(); p > maxRandomModelParams {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "random_model: %d weights, at most %d", p, maxRandomModelParams)
	}
	opener, ok := m.engine.(DirOpener)
	if !ok {
		return nil, protocol.UserErrorf(ErrInvalidRequest, "this node's %s engine cannot open a generated model", m.engine.Backend())
	}
	dir, err := os.MkdirTemp(m.cfg.TempDir, "random-model-")
	if err != nil {
		return nil, fmt.Errorf("random model: %w", err)
	}
	cfg := trainer.Config{HiddenSize: rm.HiddenSize, IntermediateSize: rm.IntermediateSize, NumHiddenLayers: rm.Layers,
		NumAttentionHeads: rm.Heads, NumKeyValueHeads: rm.KVHeads, VocabSize: rm.VocabSize, MaxPositionEmbeddings: rm.Context,
		BOSTokenID: trainer.TokenIDs{1}, EOSTokenID: trainer.TokenIDs{2}}
	if err := trainer.GenerateRandomModel(dir, cfg, rm.Seed, ""); err != nil {
		_ = os.RemoveAll(dir)
		return nil, protocol.UserErrorf(ErrInvalidRequest, "random_model: %v", err)
	}
	sess, err := opener.OpenDir(ctx, dir, spec)
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, err
	}
	return &randomModelSession{Session: sess, dir: dir}, nil
}

// randomModelSession deletes its generated model when it closes.
type randomModelSession struct {
	Session
	dir string
}

func (s *randomModelSession) Close() error {
	err := s.Session.Close()
	return errors.Join(err, os.RemoveAll(s.dir))
}

// reinit answers an init for a run already open here: the same spec (a
// retried init, or the coordinator re-placing a run on the node that has
// it) is a success; another spec is a conflict.
func (m *Manager) reinit(r *run, spec protocol.SessionSpec) (protocol.SessionResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return protocol.SessionResponse{}, fmt.Errorf("%w: run %s is closing", ErrUnavailable, spec.RunID)
	}
	a, b := r.spec, spec
	a.ResumeFrom, b.ResumeFrom = nil, nil
	if !reflect.DeepEqual(a, b) {
		return protocol.SessionResponse{}, fmt.Errorf("%w: run %s is open here with another spec", ErrConflict, spec.RunID)
	}
	return bodyResponse(protocol.SessionState{RunID: spec.RunID, Step: r.sess.Step(), Backend: m.engine.Backend()}, protocol.Usage{}, nil)
}

func (m *Manager) getRun(runID string) (*run, error) {
	m.mu.Lock()
	r, ok := m.runs[runID]
	m.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%w: %s", ErrUnknownRun, runID)
	}
	r.mu.Lock()
	if r.closed || r.sess == nil {
		r.mu.Unlock()
		return nil, fmt.Errorf("%w: %s", ErrUnknownRun, runID)
	}
	return r, nil // locked
}

func (m *Manager) onRun(ctx context.Context, req protocol.SessionRequest) (protocol.SessionResponse, error) {
	r, err := m.getRun(req.RunID)
	if err != nil {
		return protocol.SessionResponse{}, err
	}
	defer r.mu.Unlock()
	switch req.Call {
	case protocol.CallSaveState:
		var body protocol.SaveStateRequest
		if err := decodeBody(req.Body, &body); err != nil {
			return protocol.SessionResponse{}, err
		}
		if body.Mode == "" {
			body.Mode = ModeAdapter
		}
		if body.Mode != ModeAdapter && body.Mode != ModeFull {
			return protocol.SessionResponse{}, protocol.UserErrorf(ErrInvalidRequest, "mode %q is not a checkpoint mode: use adapter or full", body.Mode)
		}
		cp, stored, err := m.checkpoint(ctx, r, body.Mode)
		if err != nil {
			return protocol.SessionResponse{}, err
		}
		return bodyResponse(protocol.SaveStateResponse{Checkpoint: cp}, protocol.Usage{StoredBytes: stored}, &cp)
	case protocol.CallLoadState:
		var body protocol.LoadStateRequest
		if err := decodeBody(req.Body, &body); err != nil {
			return protocol.SessionResponse{}, err
		}
		if body.Checkpoint == "" {
			return protocol.SessionResponse{}, protocol.UserErrorf(ErrInvalidRequest, "checkpoint is missing: give a checkpoint id, URI or CID")
		}
		if err := m.load(ctx, r.sess, body.Checkpoint, body.WeightsOnly); err != nil {
			return protocol.SessionResponse{}, err
		}
		return bodyResponse(protocol.SessionState{RunID: req.RunID, Step: r.sess.Step(), Backend: m.engine.Backend()}, protocol.Usage{}, nil)
	}

	resp, err := Compute(ctx, r.sess, req.Call, req.Body)
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("%s: %w", req.Call, err)
	}
	if req.Call == protocol.CallOptimStep {
		if every, step := r.spec.CheckpointEvery, r.sess.Step(); every > 0 && step > 0 && step%every == 0 {
			// The step itself succeeded; a failed automatic checkpoint is
			// logged and the run goes on (the next one may succeed).
			cp, stored, err := m.checkpoint(ctx, r, ModeFull)
			if err != nil {
				m.log.Warn("automatic checkpoint failed", "run", req.RunID, "step", step, "err", err)
			} else {
				resp.Checkpoint = &cp
				resp.Usage.StoredBytes += stored
			}
		}
	}
	return resp, nil
}

// checkpoint saves the session into a temporary directory and uploads it.
func (m *Manager) checkpoint(ctx context.Context, r *run, mode string) (protocol.Checkpoint, int64, error) {
	if m.cfg.Storage == nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("%w: no storage configured", ErrCheckpoint)
	}
	dir, err := os.MkdirTemp(m.cfg.TempDir, "signal-ckpt-")
	if err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	defer os.RemoveAll(dir)
	if err := r.sess.SaveState(ctx, dir, mode); err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("%w: save %s state: %w", ErrCheckpoint, mode, err)
	}
	cp, stored, err := storage.SaveDir(ctx, m.cfg.Storage, dir, r.spec.RunID, r.sess.Step(), mode)
	if err != nil {
		return protocol.Checkpoint{}, 0, fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	m.log.Info("checkpoint saved", "run", r.spec.RunID, "step", cp.Step, "mode", mode, "uri", cp.URI, "bytes", stored)
	return cp, stored, nil
}

// load fetches and verifies a checkpoint, then restores the session from it.
func (m *Manager) load(ctx context.Context, sess Session, ref string, weightsOnly bool) error {
	dir, err := os.MkdirTemp(m.cfg.TempDir, "signal-load-")
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	defer os.RemoveAll(dir)
	if _, err := m.res.Fetch(ctx, ref, dir); err != nil {
		return fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	if weightsOnly {
		// Without its trainer state a checkpoint loads as an adapter alone:
		// fresh moments, step 0.
		for _, f := range []string{trainer.OptimizerFile, trainer.TrainerStateFile} {
			if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("%w: %w", ErrCheckpoint, err)
			}
		}
	}
	if err := sess.LoadState(ctx, dir); err != nil {
		return fmt.Errorf("%w: load state %s: %w", ErrCheckpoint, ref, err)
	}
	return nil
}

// closeRun ends a run's session; closing a run that is not open succeeds,
// so that a retried close after a node restart is not an error.
func (m *Manager) closeRun(req protocol.SessionRequest) (protocol.SessionResponse, error) {
	m.mu.Lock()
	r, ok := m.runs[req.RunID]
	m.mu.Unlock()
	state := protocol.SessionState{RunID: req.RunID, Closed: true, Backend: m.engine.Backend()}
	if !ok {
		return bodyResponse(state, protocol.Usage{}, nil)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	var err error
	if !r.closed && r.sess != nil {
		state.Step = r.sess.Step()
		err = r.sess.Close()
	}
	r.closed = true
	m.mu.Lock()
	if m.runs[req.RunID] == r {
		delete(m.runs, req.RunID)
	}
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("close session", "run", req.RunID, "err", err)
	}
	return bodyResponse(state, protocol.Usage{}, nil)
}

// Drain refuses new calls, waits for running ones (until ctx ends), then
// saves a full checkpoint of every open session (when storage is set) and
// closes it. It returns the checkpoints taken, by run id.
func (m *Manager) Drain(ctx context.Context) map[string]protocol.Checkpoint {
	m.mu.Lock()
	m.closing = true
	m.mu.Unlock()
	done := make(chan struct{})
	go func() { m.inflight.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		m.log.Warn("drain: calls still running at the deadline")
	}
	m.mu.Lock()
	runs := make([]*run, 0, len(m.runs))
	for _, r := range m.runs {
		runs = append(runs, r)
	}
	m.runs = make(map[string]*run)
	m.mu.Unlock()

	out := make(map[string]protocol.Checkpoint)
	for _, r := range runs {
		r.mu.Lock()
		if !r.closed && r.sess != nil {
			if m.cfg.Storage != nil && ctx.Err() == nil {
				if cp, _, err := m.checkpoint(ctx, r, ModeFull); err != nil {
					m.log.Warn("drain: checkpoint failed", "run", r.spec.RunID, "err", err)
				} else {
					out[r.spec.RunID] = cp
				}
			}
			if err := r.sess.Close(); err != nil {
				m.log.Warn("drain: close session", "run", r.spec.RunID, "err", err)
			}
		}
		r.closed = true
		r.mu.Unlock()
	}
	return out
}

func decodeBody(body []byte, v any) error {
	if len(body) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &protocol.UserError{Msg: fmt.Sprintf("the request body does not decode: %v", err), Err: errors.Join(ErrInvalidRequest, err)}
	}
	return nil
}

func bodyResponse(v any, usage protocol.Usage, cp *protocol.Checkpoint) (protocol.SessionResponse, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return protocol.SessionResponse{}, fmt.Errorf("encode response: %w", err)
	}
	return protocol.SessionResponse{Body: b, Usage: usage, Checkpoint: cp}, nil
}

// errorResponse maps an error to the public API's error codes: the one
// place where node errors become codes.
// The message is the user's sentence where the error carries one
// (protocol.UserError), so the coordinator passes on a sentence, not a chain.
func errorResponse(requestID string, err error) protocol.SessionResponse {
	return protocol.SessionResponse{RequestID: requestID, Error: &protocol.ErrorBody{Code: ErrorCode(err), Message: protocol.UserMessage(err)}}
}

// ErrorCode is the public API error code for a node error.
func ErrorCode(err error) string {
	switch {
	case errors.Is(err, storage.ErrCIDMismatch), errors.Is(err, storage.ErrInvalidManifest),
		errors.Is(err, storage.ErrInvalidURL), errors.Is(err, storage.ErrForeignStore), errors.Is(err, ErrInvalidRequest):
		return protocol.CodeInvalidRequest
	case errors.Is(err, storage.ErrNotFound), errors.Is(err, ErrUnknownRun):
		return protocol.CodeNotFound
	case errors.Is(err, ErrUnknownModel):
		return protocol.CodeUnknownModel
	case errors.Is(err, ErrOutOfMemory):
		return protocol.CodeOutOfMemory
	case errors.Is(err, ErrUnavailable):
		return protocol.CodeUnavailable
	case errors.Is(err, ErrConflict):
		return protocol.CodeConflict
	}
	return protocol.CodeInternal
}
