package coordinator

import (
	"errors"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/signal-p2p/signal/protocol"
)

var fuzzModel = ModelSpec{Name: "tiny", ContextLength: 64, Prices: DefaultPrices}

// FuzzDecodeRequests feeds arbitrary bodies to every request decoder and
// validator: each must answer nil or an ErrInvalidRequest, never panic.
func FuzzDecodeRequests(f *testing.F) {
	for _, s := range []string{
		`{"data":[{"model_input":{"tokens":[1,2]},"loss_fn_inputs":{"target_tokens":[2,3],"weights":[1,1]}}]}`,
		`{"examples":[{"prompt":"a","completion":"b"}],"loss_fn":"ppo"}`,
		`{"prompts":[{"text":"hi"}],"num_samples":2,"sampling_params":{"max_tokens":5,"top_p":0.5}}`,
		`{"adam_params":{"learning_rate":1e-4}}`,
		`{"base_model":"tiny","lora_rank":8,"lr_schedule":{"kind":"cosine","peak_lr":0.001}}`,
		`{"mode":"full"}`, `{"credits":-1}`, `{`, `[]`, `null`, `{"data":1e400}`,
	} {
		f.Add([]byte(s))
	}
	c := &Coordinator{models: newRegistry([]ModelSpec{fuzzModel})}
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, call := range []protocol.Call{protocol.CallForwardBackward, protocol.CallForward, protocol.CallOptimStep, protocol.CallSample, protocol.CallSaveState} {
			q, err := quoteCall(call, b, fuzzModel, protocol.Run{LoRARank: 8, CheckpointEvery: 1}, nil)
			if err != nil && !errors.Is(err, ErrInvalidRequest) {
				t.Fatalf("%s: error %v is not invalid_request", call, err)
			}
			if q.credits < 0 || q.max.TrainTokens < 0 || q.max.PrefillTokens < 0 || q.max.SampledTokens < 0 || q.max.StoredBytes < 0 {
				t.Fatalf("%s: negative quote %+v", call, q)
			}
		}
		var req protocol.CreateRunRequest
		if err := decodeJSON(b, &req, false); err == nil {
			if _, _, err := c.validateCreateRun(&req); err != nil && !errors.Is(err, ErrInvalidRequest) && !errors.Is(err, ErrUnknownModel) {
				t.Fatalf("create run: %v", err)
			}
		} else if !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("decode: %v", err)
		}
		var cr protocol.CreditRequest
		if err := decodeJSON(b, &cr, false); err != nil && !errors.Is(err, ErrInvalidRequest) {
			t.Fatalf("credit: %v", err)
		}
	})
}

// FuzzApply feeds arbitrary log entries to the FSM: it must never panic and
// must keep the ledger's invariants, whatever a corrupt entry holds.
func FuzzApply(f *testing.F) {
	k, _ := newCommand(cmdCreateKey, createKeyCmd{Key: KeyRecord{Hash: "h", Account: "a"}, Credits: 10})
	c, _ := newCommand(cmdCharge, chargeCmd{Account: "a", Cost: protocol.Cost{MicroCredits: 3}, Time: "t"})
	f.Add(encodeBatch([]command{k, c}))
	f.Add(append([]byte{byte(cmdMint)}, `{"account":"a","amount":5}`...))
	f.Add([]byte{byte(cmdChargeBin), 1, 2, 3})
	// Commands of a type this version does not know, flagged ignorable and not.
	f.Add(encodeBatch([]command{{typ: 0x7e | ignoreUnknownTypeFlag, payload: []byte(`{}`)}, k, {typ: 0x7e, payload: []byte(`{}`)}}))
	f.Add([]byte{byte(0x7e | ignoreUnknownTypeFlag), '{', '}'})
	// Escrow: an escrowed charge, a verdict each way, a release.
	ec, _ := newCommand(cmdCharge, chargeCmd{Account: "a", Operator: "op", Node: "n", FeeBPS: 1000, Cost: protocol.Cost{MicroCredits: 5}, Time: "2026-01-01T00:00:00Z"})
	pass, _ := newCommand(cmdAuditResult, auditResultCmd{Node: "n", At: 1, Audit: protocol.Audit{ID: "x", Validator: "v", Passed: true}, ValidatorOperator: "op2", ValidatorPay: 1})
	fail, _ := newCommand(cmdAuditResult, auditResultCmd{Node: "n", At: 2, Audit: protocol.Audit{ID: "y", Validator: "v"}})
	rel, _ := newCommand(cmdReleaseEscrow, releaseEscrowCmd{Cutoff: 1, Nodes: []string{"n"}})
	lift, _ := newCommand(cmdLiftQuarantine, liftQuarantineCmd{PeerID: "n", Reason: "r", Time: "t"})
	pend, _ := newCommand(cmdAuditQueue, auditQueueCmd{Put: &PendingAudit{ID: "y", RunID: "r", Node: "n", Time: "t"}})
	f.Add(encodeBatch([]command{ec, pend, pass, ec, rel, ec, fail, lift, ec}))
	// The Tinker door: a submit, its answer, a sampler and a checkpoint name.
	sub, _ := newCommand(cmdTinker, tinkerCmd{Submit: &TinkerFuture{ID: "create:s:train:0", Account: "a", Kind: kindCreateModel, Request: []byte(`{}`)}, MaxPendingBytes: 100})
	fin, _ := newCommand(cmdTinker, tinkerCmd{Finish: &tinkerFinish{ID: "create:s:train:0", Status: futureDone, Result: []byte(`{}`)},
		Models: []TinkerModel{{ID: "s:train:0", Account: "a", RunID: "r"}}, Samplers: []TinkerSampler{{ID: "s:sample:0", Account: "a"}},
		Checkpoints: []TinkerCheckpoint{{Path: "tinker://r/weights/x", Account: "a", RunID: "r"}}, MaxBytes: 10})
	f.Add(encodeBatch([]command{sub, fin, sub}))
	f.Fuzz(func(t *testing.T, data []byte) {
		m := newFSM()
		m.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: encodeBatch([]command{k})})
		m.Apply(&raft.Log{Index: 2, Type: raft.LogCommand, Data: data})
		if err := m.state.Ledger().Check(); err != nil {
			t.Fatalf("ledger invariants after entry %x: %v", data, err)
		}
	})
}
