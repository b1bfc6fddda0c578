package trainer

import (
	"context"
	"errors"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func mustSession(t *testing.T, m *Model, cfg SessionConfig) *Session {
	t.Helper()
	s, err := NewSession(m, cfg)
	if err != nil {
		t.Fatalf("NewSession: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func mustFB(t *testing.T, s *Session, data []Datum) *ForwardResult {
	t.Helper()
	res, err := s.ForwardBackward(context.Background(), data, LossCrossEntropy, nil)
	if err != nil {
		t.Fatalf("ForwardBackward: %v", err)
	}
	return res
}

func mustStep(t *testing.T, s *Session, p AdamParams) *OptimResult {
	t.Helper()
	res, err := s.OptimStep(context.Background(), p)
	if err != nil {
		t.Fatalf("OptimStep: %v", err)
	}
	return res
}

func adamLR(lr float64) AdamParams {
	p := DefaultAdamParams()
	p.LearningRate = lr
	return p
}

// maxRelDiff is the largest |a−b| over all adapter tensors, relative to the
// largest |b|.
func maxRelDiff(a, b *LoRA) float64 {
	var diff, scale float64
	tb := tensors(b)
	for i, ta := range tensors(a) {
		for j := range ta {
			diff = math.Max(diff, math.Abs(float64(ta[j]-tb[i][j])))
			scale = math.Max(scale, math.Abs(float64(tb[i][j])))
		}
	}
	return diff / math.Max(scale, 1e-30)
}

func sameBits(a, b *LoRA) bool {
	tb := tensors(b)
	ta := tensors(a)
	if len(ta) != len(tb) {
		return false
	}
	for i := range ta {
		if !slices.Equal(ta[i], tb[i]) {
			return false
		}
	}
	return true
}

func TestFreshAdapterLeavesOutputsUnchanged(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	s := mustSession(t, m, SessionConfig{Rank: 4, Seed: 1})
	data := randomData(rand.New(rand.NewSource(1)), m.Config().VocabSize, 6, 11)
	got, err := s.Forward(context.Background(), data, LossCrossEntropy, nil)
	if err != nil {
		t.Fatal(err)
	}
	base, err := runPass(context.Background(), m, nil, data, LossCrossEntropy, nil, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got.LossSum != base.LossSum {
		t.Fatalf("fresh adapter loss %v, base model %v: B = 0 must leave outputs unchanged", got.LossSum, base.LossSum)
	}
	// And against the inference half's logits.
	logits, err := m.Logits(context.Background(), data[0].Tokens, nil)
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config().VocabSize
	for i, tgt := range data[0].TargetTokens {
		row := logits[i*V : (i+1)*V]
		want := float64(row[tgt]) - logSumExp(row)
		if d := math.Abs(want - float64(got.Logprobs[0][i])); d > 1e-4 {
			t.Errorf("logprob[%d] = %v, inference forward gives %v", i, got.Logprobs[0][i], want)
		}
	}
	if got.Tokens != 17 {
		t.Errorf("tokens = %d, want 17", got.Tokens)
	}
}

// TestGradientAccumulation: two ForwardBackward calls then one OptimStep
// give the update of one call with all the data (the loss is a sum).
func TestGradientAccumulation(t *testing.T) {
	m := mustLoad(t, "tiny-bl")
	r := rand.New(rand.NewSource(2))
	d1 := randomData(r, m.Config().VocabSize, 5, 9)
	d2 := randomData(r, m.Config().VocabSize, 13)
	split := mustSession(t, m, SessionConfig{Rank: 4, Seed: 3})
	whole := mustSession(t, m, SessionConfig{Rank: 4, Seed: 3})
	for step := 0; step < 3; step++ {
		a, b := mustFB(t, split, d1), mustFB(t, split, d2)
		w := mustFB(t, whole, append(append([]Datum(nil), d1...), d2...))
		if d := math.Abs(a.LossSum + b.LossSum - w.LossSum); d > 1e-4*math.Abs(w.LossSum) {
			t.Fatalf("step %d: loss sums %v + %v, one call %v", step, a.LossSum, b.LossSum, w.LossSum)
		}
		rs, rw := mustStep(t, split, adamLR(1e-2)), mustStep(t, whole, adamLR(1e-2))
		if math.Abs(rs.GradNorm-rw.GradNorm) > 1e-5*rw.GradNorm {
			t.Fatalf("step %d: accumulated grad norm %v, one call %v", step, rs.GradNorm, rw.GradNorm)
		}
	}
	// Only float32 summation order differs between the two.
	if d := maxRelDiff(split.LoRA(), whole.LoRA()); d > 1e-5 {
		t.Fatalf("adapters differ by %g after 3 accumulated steps", d)
	}
}

func TestOptimStepWithoutGradients(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	s := mustSession(t, m, SessionConfig{Rank: 2})
	if _, err := s.OptimStep(context.Background(), adamLR(1e-3)); !errors.Is(err, ErrNoGradients) || !errors.Is(err, ErrInvalidInput) {
		t.Fatalf("OptimStep on a fresh session: %v, want ErrNoGradients", err)
	}
	mustFB(t, s, randomData(rand.New(rand.NewSource(1)), 100, 4))
	if r := mustStep(t, s, adamLR(1e-3)); r.Step != 1 || r.LearningRate != 1e-3 || !(r.GradNorm > 0) {
		t.Fatalf("OptimStep = %+v, want step 1, lr 1e-3, grad norm > 0", r)
	}
	if _, err := s.OptimStep(context.Background(), adamLR(1e-3)); !errors.Is(err, ErrNoGradients) {
		t.Fatalf("second OptimStep without new gradients: %v, want ErrNoGradients", err)
	}
	if s.Step() != 1 {
		t.Fatalf("Step() = %d after a rejected step, want 1", s.Step())
	}
}

// TestRejectedCallsLeaveStateUnchanged: after every kind of rejected call
// the session trains exactly as one that never saw it.
func TestRejectedCallsLeaveStateUnchanged(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	V := m.Config().VocabSize
	good := randomData(rand.New(rand.NewSource(4)), V, 7, 3)
	ref := mustSession(t, m, SessionConfig{Rank: 4, Seed: 9})
	s := mustSession(t, m, SessionConfig{Rank: 4, Seed: 9})
	for _, x := range []*Session{ref, s} {
		mustFB(t, x, good)
		mustStep(t, x, adamLR(1e-2))
		mustFB(t, x, good)
	}
	bad := func(mod func(d *Datum)) []Datum {
		d := randomData(rand.New(rand.NewSource(5)), V, 6, 6)
		mod(&d[1])
		return d
	}
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name string
		call func() error
		want string
	}{
		{"token id", func() error {
			_, err := s.ForwardBackward(context.Background(), bad(func(d *Datum) { d.Tokens[2] = V }), "", nil)
			return err
		}, "data[1].model_input.tokens[2]"},
		{"NaN weight", func() error {
			_, err := s.ForwardBackward(context.Background(), bad(func(d *Datum) { d.Weights[0] = float32(math.NaN()) }), "", nil)
			return err
		}, "data[1].loss_fn_inputs.weights[0]"},
		{"length", func() error {
			_, err := s.ForwardBackward(context.Background(), bad(func(d *Datum) { d.TargetTokens = d.TargetTokens[1:] }), "", nil)
			return err
		}, "data[1].loss_fn_inputs.target_tokens"},
		{"over context", func() error {
			long := randomData(rand.New(rand.NewSource(6)), V, m.Config().MaxPositionEmbeddings+1)
			_, err := s.ForwardBackward(context.Background(), long, "", nil)
			return err
		}, "data[0].model_input.tokens"},
		{"empty", func() error { _, err := s.ForwardBackward(context.Background(), nil, "", nil); return err }, "data"},
		{"unknown loss", func() error { _, err := s.ForwardBackward(context.Background(), good, "mse", nil); return err }, "loss_fn"},
		{"rl without advantages", func() error {
			_, err := s.ForwardBackward(context.Background(), good, LossImportanceSampling, nil)
			return err
		}, "data[0].loss_fn_inputs.logprobs"},
		{"cancelled", func() error { _, err := s.ForwardBackward(cancelled, good, "", nil); return err }, "context canceled"},
		{"bad beta", func() error {
			p := adamLR(1e-2)
			p.Beta2 = 1.5
			_, err := s.OptimStep(context.Background(), p)
			return err
		}, "beta2"},
		{"bad save mode", func() error { _, err := s.SaveState(t.TempDir(), "weights"); return err }, "mode"},
		{"load missing", func() error { return s.LoadState(filepath.Join(t.TempDir(), "nope")) }, "adapter_config.json"},
	} {
		err := tc.call()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one naming %q", tc.name, err, tc.want)
		}
	}
	if s.Step() != 1 {
		t.Fatalf("Step() = %d, want 1", s.Step())
	}
	a, b := mustStep(t, ref, adamLR(1e-2)), mustStep(t, s, adamLR(1e-2))
	if a.GradNorm != b.GradNorm || !sameBits(ref.LoRA(), s.LoRA()) {
		t.Fatalf("after rejected calls the session trains differently (grad norm %v vs %v)", b.GradNorm, a.GradNorm)
	}
}

func TestNewSessionRejectsBadConfig(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	for _, tc := range []struct {
		cfg  SessionConfig
		want string
	}{
		{SessionConfig{Rank: -1}, "rank"},
		{SessionConfig{Rank: 0}, "rank"},
		{SessionConfig{Rank: 4, TargetModules: []string{"qkv"}}, "qkv"},
		{SessionConfig{Rank: 4, Alpha: float32(math.Inf(1))}, "alpha"},
		{SessionConfig{Rank: 4, Schedule: &LRSchedule{Kind: "cosine", PeakLR: 1e-3}}, "total_steps"},
	} {
		if _, err := NewSession(m, tc.cfg); !errors.Is(err, ErrInvalidInput) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("NewSession(%+v): %v, want ErrInvalidInput naming %s", tc.cfg, err, tc.want)
		}
	}
}

func TestScheduleDrivesOptimStep(t *testing.T) {
	m := mustLoad(t, "tiny-bl")
	sch := &LRSchedule{Kind: "cosine", PeakLR: 1e-2, WarmupSteps: 2, TotalSteps: 6, FinalFraction: 0.1}
	s := mustSession(t, m, SessionConfig{Rank: 2, Schedule: sch})
	data := randomData(rand.New(rand.NewSource(8)), 1000, 5)
	for step := 1; step <= 7; step++ {
		mustFB(t, s, data)
		r := mustStep(t, s, DefaultAdamParams())
		if r.Step != step || r.LearningRate != sch.At(step) {
			t.Fatalf("step %d: OptimStep = %+v, want lr %v", step, r, sch.At(step))
		}
	}
	// A named rate overrides the schedule.
	mustFB(t, s, data)
	if r := mustStep(t, s, adamLR(0.5)); r.LearningRate != 0.5 {
		t.Fatalf("named rate: lr %v, want 0.5", r.LearningRate)
	}
}

// TestSaveLoadFullResumesBitForBit: N steps, save, load into another
// session, M steps equals N+M steps straight, bit for bit.
func TestSaveLoadFullResumesBitForBit(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	r := rand.New(rand.NewSource(10))
	batches := [][]Datum{}
	for i := 0; i < 5; i++ {
		batches = append(batches, randomData(r, m.Config().VocabSize, 4+i, 9))
	}
	p := adamLR(5e-3)
	p.WeightDecay, p.GradClipNorm = 0.01, 1.0
	straight := mustSession(t, m, SessionConfig{Rank: 4, Alpha: 8, Seed: 1})
	for _, b := range batches {
		mustFB(t, straight, b)
		mustStep(t, straight, p)
	}
	first := mustSession(t, m, SessionConfig{Rank: 4, Alpha: 8, Seed: 1})
	for _, b := range batches[:3] {
		mustFB(t, first, b)
		mustStep(t, first, p)
	}
	mustFB(t, first, batches[3]) // pending gradients travel too
	dir := t.TempDir()
	files, err := first.SaveState(dir, SaveFull)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{AdapterConfigFile, AdapterWeightsFile, OptimizerFile, TrainerStateFile}; !slices.Equal(files, want) {
		t.Fatalf("SaveState files %v, want %v", files, want)
	}
	resumed := mustSession(t, m, SessionConfig{Rank: 2, Seed: 99}) // rank and init come from the checkpoint
	if err := resumed.LoadState(dir); err != nil {
		t.Fatal(err)
	}
	if resumed.Step() != 3 {
		t.Fatalf("resumed Step() = %d, want 3", resumed.Step())
	}
	mustStep(t, resumed, p)
	mustFB(t, resumed, batches[4])
	mustStep(t, resumed, p)
	if !sameBits(resumed.LoRA(), straight.LoRA()) {
		t.Fatalf("resumed adapter differs from the straight run by %g", maxRelDiff(resumed.LoRA(), straight.LoRA()))
	}
}

func TestSaveAdapterIsPEFT(t *testing.T) {
	m := mustLoad(t, "tiny-bl")
	s := mustSession(t, m, SessionConfig{Rank: 4, Alpha: 16, TargetModules: []string{"q_proj", "down_proj"}, Seed: 2})
	mustFB(t, s, randomData(rand.New(rand.NewSource(3)), 500, 6))
	mustStep(t, s, adamLR(1e-2))
	dir := t.TempDir()
	files, err := s.SaveState(dir, SaveAdapter)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(files, []string{AdapterConfigFile, AdapterWeightsFile}) {
		t.Fatalf("files %v", files)
	}
	if _, err := os.Stat(filepath.Join(dir, OptimizerFile)); !os.IsNotExist(err) {
		t.Fatalf("adapter mode wrote %s", OptimizerFile)
	}
	l, err := LoadAdapter(dir, m)
	if err != nil {
		t.Fatal(err)
	}
	if !sameBits(l, s.LoRA()) || l.Rank != 4 || l.Alpha != 16 || !slices.Equal(l.TargetModules, []string{"q_proj", "down_proj"}) {
		t.Fatalf("reloaded adapter differs: rank %d alpha %v targets %v", l.Rank, l.Alpha, l.TargetModules)
	}
	// An adapter-only checkpoint restarts the optimizer.
	other := mustSession(t, m, SessionConfig{Rank: 8})
	if err := other.LoadState(dir); err != nil {
		t.Fatal(err)
	}
	if other.Step() != 0 || !sameBits(other.LoRA(), s.LoRA()) {
		t.Fatalf("LoadState(adapter): step %d, adapter same %v", other.Step(), sameBits(other.LoRA(), s.LoRA()))
	}
}

func TestSessionSampleUsesAdapter(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	s := mustSession(t, m, SessionConfig{Rank: 4, Seed: 5})
	randomizeB(s.LoRA(), rand.New(rand.NewSource(6)))
	p := DefaultSamplingParams()
	p.MaxTokens, p.Temperature = 5, 0
	got, err := s.Sample(context.Background(), [][]int{{1, 50, 60}}, 1, p)
	if err != nil {
		t.Fatal(err)
	}
	want, err := m.Sample(context.Background(), [][]int{{1, 50, 60}}, 1, p, s.LoRA())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got[0][0].Tokens, want[0][0].Tokens) {
		t.Fatalf("session sample %v, model sample with the adapter %v", got[0][0].Tokens, want[0][0].Tokens)
	}
}

func TestClosedSession(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	s := mustSession(t, m, SessionConfig{Rank: 2})
	mustFB(t, s, randomData(rand.New(rand.NewSource(1)), 100, 3))
	held := len(m.arenas.heldBytes())
	s.Close()
	left := len(m.arenas.heldBytes())
	if held != 1 || left != 0 {
		t.Fatalf("model arenas: %d while the session is open (want 1), %d after its Close (want 0)", held, left)
	}
	if _, err := s.ForwardBackward(context.Background(), randomData(rand.New(rand.NewSource(1)), 100, 3), "", nil); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("ForwardBackward after Close: %v", err)
	}
	if _, err := s.OptimStep(context.Background(), adamLR(1)); !errors.Is(err, ErrSessionClosed) {
		t.Fatalf("OptimStep after Close: %v", err)
	}
}

// TestSessionsShareModelConcurrently: sessions on one base model train at
// the same time (the base is read-only, arenas are per call) and each ends
// exactly where it would alone.
func TestSessionsShareModelConcurrently(t *testing.T) {
	m := mustLoad(t, "tiny-bl")
	V := m.Config().VocabSize
	const n = 3
	alone := make([]*LoRA, n)
	for i := 0; i < n; i++ {
		s := mustSession(t, m, SessionConfig{Rank: 2, Seed: int64(i)})
		data := randomData(rand.New(rand.NewSource(int64(i))), V, 5+i, 3)
		for step := 0; step < 3; step++ {
			mustFB(t, s, data)
			mustStep(t, s, adamLR(1e-2))
		}
		alone[i] = s.LoRA()
	}
	errs := make(chan error, n)
	together := make([]*Session, n)
	for i := 0; i < n; i++ {
		together[i] = mustSession(t, m, SessionConfig{Rank: 2, Seed: int64(i)})
	}
	for i := 0; i < n; i++ {
		go func() {
			s := together[i]
			data := randomData(rand.New(rand.NewSource(int64(i))), V, 5+i, 3)
			for step := 0; step < 3; step++ {
				if _, err := s.ForwardBackward(context.Background(), data, LossCrossEntropy, nil); err != nil {
					errs <- err
					return
				}
				if _, err := s.OptimStep(context.Background(), adamLR(1e-2)); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for i := 0; i < n; i++ {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		if !sameBits(together[i].LoRA(), alone[i]) {
			t.Errorf("session %d trained concurrently differs from alone by %g", i, maxRelDiff(together[i].LoRA(), alone[i]))
		}
	}
}

// ForwardTopK's top tokens are the k largest of each position's
// log-softmax (from the inference half's logits), most likely first.
func TestForwardTopK(t *testing.T) {
	m := mustLoad(t, "tiny-sp")
	s := mustSession(t, m, SessionConfig{Rank: 4, Seed: 1})
	data := randomData(rand.New(rand.NewSource(2)), m.Config().VocabSize, 7, 5)
	const k = 5
	res, err := s.ForwardTopK(context.Background(), data, LossCrossEntropy, nil, k)
	if err != nil {
		t.Fatal(err)
	}
	V := m.Config().VocabSize
	for di, d := range data {
		logits, err := m.Logits(context.Background(), d.Tokens, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(res.TopIDs[di]) != len(d.Tokens)*k || len(res.TopLogprobs[di]) != len(d.Tokens)*k {
			t.Fatalf("datum %d: %d ids, %d logprobs for %d positions", di, len(res.TopIDs[di]), len(res.TopLogprobs[di]), len(d.Tokens))
		}
		for pos := range d.Tokens {
			row := logits[pos*V : (pos+1)*V]
			lse := logSumExp(row)
			order := make([]int, V)
			for j := range order {
				order[j] = j
			}
			slices.SortStableFunc(order, func(a, b int) int { return cmpDesc(row[a], row[b]) })
			for j := 0; j < k; j++ {
				gotID, gotLP := res.TopIDs[di][pos*k+j], res.TopLogprobs[di][pos*k+j]
				want := float64(row[order[j]]) - lse
				if int(gotID) != order[j] || math.Abs(float64(gotLP)-want) > 1e-4 {
					t.Fatalf("datum %d position %d rank %d: token %d logprob %v, want %d %v", di, pos, j, gotID, gotLP, order[j], want)
				}
			}
		}
	}
	if _, err := s.ForwardTopK(context.Background(), data, LossCrossEntropy, nil, MaxTopK+1); err == nil {
		t.Errorf("top-k %d accepted", MaxTopK+1)
	}
}

func cmpDesc(a, b float32) int {
	switch {
	case a > b:
		return -1
	case a < b:
		return 1
	}
	return 0
}
