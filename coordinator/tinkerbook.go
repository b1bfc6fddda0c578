package coordinator

import (
	"encoding/json"
	"fmt"
	"maps"
	"sort"

	"github.com/signal-p2p/signal/protocol"
)

// The Tinker door's replicated records (tinker.go serves them, tinkerexec.go
// runs the queued calls). Every Tinker call returns a future at once; the
// future, with the call it stands for, is a raft record, so a new leader
// finds the queue as the old one left it and runs what is left, and a
// client's retrieve_future finds its answer on whichever member leads.

// Future states.
const (
	futurePending = "pending"
	futureDone    = "done"
	futureFailed  = "failed"
)

// TinkerFuture is one queued call and, once run, its answer.
type TinkerFuture struct {
	ID      string `json:"id"`
	Account string `json:"account"`
	// Model orders the call: a model's calls run one at a time in Seq
	// order (Tinker's seq_id), whatever order they arrived in. Empty for
	// calls with no order (create_model, asample).
	Model string `json:"model,omitempty"`
	Seq   int    `json:"seq,omitempty"`
	Kind  string `json:"kind"`
	// Request is the call to run (tinkerexec.go's types), dropped once it ran.
	Request json.RawMessage `json:"request,omitempty"`
	Status  string          `json:"status"`
	// Result is the answer (JSON; tinker.go encodes it as the client asks).
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	Category string          `json:"category,omitempty"`
	Time     string          `json:"time"`
}

func (f TinkerFuture) size() int64 {
	return int64(len(f.ID) + len(f.Model) + len(f.Kind) + len(f.Request) + len(f.Result) + len(f.Error) + 96)
}

// TinkerModel is a Tinker model: a name for one of the account's runs, and
// how far its ordered calls have run.
type TinkerModel struct {
	ID        string `json:"id"`
	Account   string `json:"account"`
	RunID     string `json:"run_id"`
	BaseModel string `json:"base_model"`
	Rank      int    `json:"rank"`
	// Done is the highest seq_id that ran.
	Done int    `json:"done"`
	Time string `json:"time"`
}

// TinkerSampler is a sampling session: the weights it samples are the
// training run's at Step (while the run is still there: Checkpoint, a
// saved adapter, otherwise), or the base model when both are empty.
type TinkerSampler struct {
	ID         string `json:"id"`
	Account    string `json:"account"`
	BaseModel  string `json:"base_model"`
	RunID      string `json:"run_id,omitempty"`
	Step       int    `json:"step"`
	Checkpoint string `json:"checkpoint,omitempty"`
	ModelPath  string `json:"model_path,omitempty"`
	// SampleRun is the run opened to sample Checkpoint (or the base
	// model) once RunID has moved past Step.
	SampleRun string `json:"sample_run,omitempty"`
	Time      string `json:"time"`
}

// TinkerCheckpoint names one of the account's Signal checkpoints by its
// tinker:// path.
type TinkerCheckpoint struct {
	Path       string `json:"path"`
	Account    string `json:"account"`
	RunID      string `json:"run_id"`
	Name       string `json:"name"`
	Type       string `json:"type"` // "training" or "sampler"
	Checkpoint string `json:"checkpoint"`
	Size       int64  `json:"size"`
	Time       string `json:"time"`
	// Expires is when the name is forgotten (its TTL; "" keeps it).
	Expires string `json:"expires,omitempty"`
}

// tinkerCmd is the one Tinker command: a submit, a finish, records put or
// deleted. One type keeps the log's vocabulary small; each part is applied
// in this order.
type tinkerCmd struct {
	Submit            *TinkerFuture      `json:"submit,omitempty"`
	Finish            *tinkerFinish      `json:"finish,omitempty"`
	Models            []TinkerModel      `json:"models,omitempty"`
	Samplers          []TinkerSampler    `json:"samplers,omitempty"`
	Checkpoints       []TinkerCheckpoint `json:"checkpoints,omitempty"`
	DeleteCheckpoints []string           `json:"delete_checkpoints,omitempty"`
	// MaxPendingBytes bounds the account's queued calls (the leader's
	// setting, carried so every member applies the same rule).
	MaxPendingBytes int64 `json:"max_pending_bytes,omitempty"`
	// MaxBytes bounds the account's futures, answers included: finished
	// ones are forgotten oldest first past it.
	MaxBytes int64 `json:"max_bytes,omitempty"`
}

type tinkerFinish struct {
	ID       string          `json:"id"`
	Status   string          `json:"status"`
	Result   json.RawMessage `json:"result,omitempty"`
	Error    string          `json:"error,omitempty"`
	Category string          `json:"category,omitempty"`
}

// tinkerBook is the State's part for the Tinker door.
type tinkerBook struct {
	futures map[string]TinkerFuture
	// order is each account's futures in submission order, and bytes
	// their sizes' sum, pending its queued calls' sum: the bounds.
	order   map[string][]string
	bytes   map[string]int64
	pending map[string]int64
	// queued is the ids of the pending futures: the runner looks at these
	// on every change, not at every answer the book keeps.
	queued      map[string]bool
	models      map[string]TinkerModel
	samplers    map[string]TinkerSampler
	checkpoints map[string]TinkerCheckpoint
}

func newTinkerBook() tinkerBook {
	return tinkerBook{futures: map[string]TinkerFuture{}, order: map[string][]string{}, bytes: map[string]int64{},
		pending: map[string]int64{}, queued: map[string]bool{}, models: map[string]TinkerModel{}, samplers: map[string]TinkerSampler{},
		checkpoints: map[string]TinkerCheckpoint{}}
}

func (b tinkerBook) clone() tinkerBook {
	c := tinkerBook{futures: maps.Clone(b.futures), order: make(map[string][]string, len(b.order)), bytes: maps.Clone(b.bytes),
		pending: maps.Clone(b.pending), queued: maps.Clone(b.queued), models: maps.Clone(b.models), samplers: maps.Clone(b.samplers),
		checkpoints: maps.Clone(b.checkpoints)}
	for k, v := range b.order {
		c.order[k] = v[:len(v):len(v)]
	}
	return c
}

// ---- reads ----

// TinkerFuture returns a future.
func (s *State) TinkerFuture(id string) (TinkerFuture, bool) {
	f, ok := s.tinker.futures[id]
	return f, ok
}

// TinkerModel returns a model.
func (s *State) TinkerModel(id string) (TinkerModel, bool) {
	m, ok := s.tinker.models[id]
	return m, ok
}

// TinkerSampler returns a sampling session.
func (s *State) TinkerSampler(id string) (TinkerSampler, bool) {
	m, ok := s.tinker.samplers[id]
	return m, ok
}

// TinkerCheckpoint returns a checkpoint by its tinker:// path.
func (s *State) TinkerCheckpoint(path string) (TinkerCheckpoint, bool) {
	c, ok := s.tinker.checkpoints[path]
	return c, ok
}

// TinkerCheckpointsOf lists an account's checkpoints of one run (all runs
// when runID is empty), oldest first.
func (s *State) TinkerCheckpointsOf(account, runID string) []TinkerCheckpoint {
	var out []TinkerCheckpoint
	for _, c := range s.tinker.checkpoints {
		if c.Account == account && (runID == "" || c.RunID == runID) {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Time != out[j].Time {
			return out[i].Time < out[j].Time
		}
		return out[i].Path < out[j].Path
	})
	return out
}

// TinkerModelsOf lists an account's models by id.
func (s *State) TinkerModelsOf(account string) []TinkerModel {
	var out []TinkerModel
	for _, m := range s.tinker.models {
		if m.Account == account {
			out = append(out, m)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// pendingTinker returns every queued call, by id.
func (s *State) pendingTinker() []TinkerFuture {
	out := make([]TinkerFuture, 0, len(s.tinker.queued))
	for id := range s.tinker.queued {
		out = append(out, s.tinker.futures[id])
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// ---- rules ----

// ApplyTinker applies a Tinker command; a submit answers the future as
// recorded (the first one, for a repeated seq_id).
func (s *State) ApplyTinker(c tinkerCmd) (TinkerFuture, error) {
	b := &s.tinker
	var out TinkerFuture
	if f := c.Submit; f != nil {
		if old, ok := b.futures[f.ID]; ok {
			if old.Account != f.Account {
				return out, fmt.Errorf("future %s belongs to another account: %w", f.ID, ErrConflict)
			}
			out = old
		} else {
			if f.Model != "" && f.Seq > 0 {
				m, ok := b.models[f.Model]
				if !ok || m.Account != f.Account {
					return out, protocol.UserErrorf(ErrNotFound, "model_id %q is not one of your models: create it with create_model (or load_weights) first", f.Model)
				}
				if f.Seq <= m.Done {
					return out, protocol.UserErrorf(ErrInvalidRequest, "seq_id %d of model %s already ran and its answer is forgotten: number calls upward from %d", f.Seq, f.Model, m.Done+1)
				}
			}
			n := int64(len(f.Request))
			if c.MaxPendingBytes > 0 && b.pending[f.Account]+n > c.MaxPendingBytes {
				return out, protocol.UserErrorf(ErrRateLimited, "your queued Tinker calls hold %d bytes, and this one would pass the limit of %d bytes: wait for earlier calls to finish", b.pending[f.Account], c.MaxPendingBytes)
			}
			rec := *f
			rec.Status = futurePending
			b.futures[rec.ID] = rec
			b.order[rec.Account] = append(b.order[rec.Account], rec.ID)
			b.bytes[rec.Account] += rec.size()
			b.pending[rec.Account] += n
			b.queued[rec.ID] = true
			out = rec
		}
	}
	if fin := c.Finish; fin != nil {
		f, ok := b.futures[fin.ID]
		if ok && f.Status == futurePending {
			b.bytes[f.Account] -= f.size()
			b.pending[f.Account] -= int64(len(f.Request))
			delete(b.queued, f.ID)
			f.Request, f.Status, f.Result, f.Error, f.Category = nil, fin.Status, fin.Result, fin.Error, fin.Category
			b.futures[f.ID] = f
			b.bytes[f.Account] += f.size()
			if m, ok := b.models[f.Model]; ok && f.Seq > m.Done {
				m.Done = f.Seq
				b.models[m.ID] = m
			}
			out = f
		}
	}
	// A record is its account's: a put naming another account's record
	// (the ids are derived from session ids a client sends) changes nothing.
	for _, m := range c.Models {
		old, ok := b.models[m.ID]
		if ok && old.Account != m.Account {
			return out, protocol.UserErrorf(ErrConflict, "model_id %q is another account's", m.ID)
		}
		if ok && old.Done > m.Done {
			m.Done = old.Done
		}
		b.models[m.ID] = m
	}
	for _, sm := range c.Samplers {
		if old, ok := b.samplers[sm.ID]; ok && old.Account != sm.Account {
			return out, protocol.UserErrorf(ErrConflict, "sampling session %q is another account's", sm.ID)
		}
		b.samplers[sm.ID] = sm
	}
	for _, cp := range c.Checkpoints {
		if old, ok := b.checkpoints[cp.Path]; ok && old.Account != cp.Account {
			return out, protocol.UserErrorf(ErrConflict, "checkpoint %q is another account's", cp.Path)
		}
		b.checkpoints[cp.Path] = cp
	}
	for _, p := range c.DeleteCheckpoints {
		delete(b.checkpoints, p)
	}
	if c.MaxBytes > 0 && out.Account != "" {
		b.evict(out.Account, c.MaxBytes)
	}
	return out, nil
}

// evict forgets an account's finished futures, oldest first, until its
// futures fit in max bytes; queued ones stay (their bound is the submit's).
func (b *tinkerBook) evict(account string, max int64) {
	if b.bytes[account] <= max {
		return
	}
	ids := b.order[account]
	keep := ids[:0:0]
	for _, id := range ids {
		f, ok := b.futures[id]
		if !ok {
			continue
		}
		if b.bytes[account] > max && f.Status != futurePending {
			b.bytes[account] -= f.size()
			delete(b.futures, id)
			continue
		}
		keep = append(keep, id)
	}
	b.order[account] = keep
}

// putTinkerFuture restores a future from a snapshot.
func (b *tinkerBook) putFuture(f TinkerFuture) {
	b.futures[f.ID] = f
	b.order[f.Account] = append(b.order[f.Account], f.ID)
	b.bytes[f.Account] += f.size()
	if f.Status == futurePending {
		b.pending[f.Account] += int64(len(f.Request))
		b.queued[f.ID] = true
	}
}

// tinkerRecord is one snapshot record of the book: exactly one field set.
type tinkerRecord struct {
	Future     *TinkerFuture     `json:"future,omitempty"`
	Model      *TinkerModel      `json:"model,omitempty"`
	Sampler    *TinkerSampler    `json:"sampler,omitempty"`
	Checkpoint *TinkerCheckpoint `json:"checkpoint,omitempty"`
}

// records lists the book in a deterministic order: futures account by
// account in submission order (so eviction order survives), then the rest.
func (b *tinkerBook) records() []tinkerRecord {
	var out []tinkerRecord
	for _, acct := range sortedKeys(b.order) {
		for _, id := range b.order[acct] {
			if f, ok := b.futures[id]; ok {
				out = append(out, tinkerRecord{Future: &f})
			}
		}
	}
	for _, k := range sortedKeys(b.models) {
		m := b.models[k]
		out = append(out, tinkerRecord{Model: &m})
	}
	for _, k := range sortedKeys(b.samplers) {
		sm := b.samplers[k]
		out = append(out, tinkerRecord{Sampler: &sm})
	}
	for _, k := range sortedKeys(b.checkpoints) {
		cp := b.checkpoints[k]
		out = append(out, tinkerRecord{Checkpoint: &cp})
	}
	return out
}

func (b *tinkerBook) restore(r tinkerRecord) error {
	switch {
	case r.Future != nil && r.Future.ID != "":
		b.putFuture(*r.Future)
	case r.Model != nil && r.Model.ID != "":
		b.models[r.Model.ID] = *r.Model
	case r.Sampler != nil && r.Sampler.ID != "":
		b.samplers[r.Sampler.ID] = *r.Sampler
	case r.Checkpoint != nil && r.Checkpoint.Path != "":
		b.checkpoints[r.Checkpoint.Path] = *r.Checkpoint
	default:
		return fmt.Errorf("tinker record without a future, model, sampler or checkpoint: %w", errBadSnapshot)
	}
	return nil
}
