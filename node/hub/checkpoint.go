package hub

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/multiformats/go-multihash"

	"github.com/signal-p2p/signal/node/storage"
	"github.com/signal-p2p/signal/protocol"
)

// The PEFT files of a checkpoint: what a push publishes. A "full"
// checkpoint's optimizer state stays in the network's store.
var adapterFiles = []string{"adapter_config.json", "adapter_model.safetensors"}

// CardFile is the model card a push writes beside the adapter.
const CardFile = "README.md"

// maxAdapterConfigBytes bounds the adapter_config.json the card is read from.
const maxAdapterConfigBytes = 1 << 20

// ErrNotAdapter means a checkpoint lacks the PEFT files a push publishes.
var ErrNotAdapter = errors.New("not a PEFT adapter checkpoint")

// PushCheckpoint commits a checkpoint's adapter to the Hub repository
// req.Repo with req.Token: its PEFT files, read from st and each verified
// by its CID (whose sha2-256 digest is also the file's LFS object id, so
// the Hub checks the bytes against the same hash), and a model card naming
// the base model, rank, steps and CIDs. c gives the Hub's address and HTTP
// client; the token is req's, for this call only.
func PushCheckpoint(ctx context.Context, c *Client, st storage.Store, run protocol.Run, cp protocol.Checkpoint, req protocol.PushRequest) (protocol.PushResponse, error) {
	if req.Token == "" {
		// Never the process's own $HF_TOKEN: the push is the caller's.
		return protocol.PushResponse{}, &StatusError{Op: "push", Status: http.StatusUnauthorized, Message: "no token"}
	}
	if err := checkRepo(req.Repo); err != nil {
		return protocol.PushResponse{}, &StatusError{Op: "push", Status: http.StatusBadRequest, Message: err.Error(), Err: err}
	}
	hc := *c
	hc.Token = req.Token
	byName := map[string]protocol.CheckpointFile{}
	for _, f := range cp.Files {
		byName[f.Name] = f
	}
	var uploads []Upload
	var pushed []protocol.PushedFile
	for _, name := range adapterFiles {
		f, ok := byName[name]
		if !ok {
			return protocol.PushResponse{}, &StatusError{Op: "push checkpoint " + cp.ID, Status: http.StatusUnprocessableEntity,
				Message: name + " is missing", Err: ErrNotAdapter}
		}
		u, err := storeUpload(st, f)
		if err != nil {
			return protocol.PushResponse{}, fmt.Errorf("push checkpoint %s: %w", cp.ID, err)
		}
		uploads = append(uploads, u)
		pushed = append(pushed, protocol.PushedFile{Name: f.Name, Size: f.Size, CID: f.CID})
	}
	cfgBytes, err := readAll(ctx, uploads[0], maxAdapterConfigBytes)
	if err != nil {
		return protocol.PushResponse{}, fmt.Errorf("push checkpoint %s: %w", cp.ID, err)
	}
	var peft struct {
		R             int     `json:"r"`
		Alpha         float64 `json:"lora_alpha"`
		RSLoRA        bool    `json:"use_rslora"`
		Targets       any     `json:"target_modules"`
		BaseModelPath string  `json:"base_model_name_or_path"`
	}
	if err := json.Unmarshal(cfgBytes, &peft); err != nil {
		return protocol.PushResponse{}, fmt.Errorf("push checkpoint %s: %w: adapter_config.json: %w", cp.ID, ErrNotAdapter, err)
	}
	card := ModelCard(CardInfo{
		Repo: req.Repo, BaseModel: run.BaseModel, BaseModelID: peft.BaseModelPath,
		Rank: peft.R, Alpha: peft.Alpha, RSLoRA: peft.RSLoRA, TargetModules: targetList(peft.Targets),
		Steps: cp.Step, RunID: run.ID, Checkpoint: cp, Files: pushed,
	})
	uploads = append(uploads, bytesUpload(CardFile, card))
	pushed = append(pushed, protocol.PushedFile{Name: CardFile, Size: int64(len(card))})

	msg := req.CommitMessage
	if msg == "" {
		msg = fmt.Sprintf("Signal checkpoint %s (run %s, step %d)", cp.ID, run.ID, cp.Step)
	}
	commit, err := hc.Push(ctx, req.Repo, PushOptions{Private: req.IsPrivate(), Message: msg,
		Description: "LoRA adapter trained on Signal; every file is named by its CID in README.md."}, uploads)
	if err != nil {
		return protocol.PushResponse{}, fmt.Errorf("push checkpoint %s to %s: %w", cp.ID, req.Repo, err)
	}
	kept := map[string]bool{}
	for _, k := range commit.Kept {
		kept[k] = true
	}
	for i := range pushed {
		pushed[i].Sent = !kept[pushed[i].Name]
	}
	return protocol.PushResponse{
		Checkpoint: cp.ID, Repo: req.Repo, URL: hc.base() + "/" + req.Repo,
		CommitURL: commit.URL, CommitOID: commit.OID, Files: pushed,
	}, nil
}

// Pusher is PushCheckpoint over the network's store st, with c's hub
// address: what a coordinator is configured with.
func Pusher(c *Client, st storage.Store) func(context.Context, protocol.Run, protocol.Checkpoint, protocol.PushRequest) (protocol.PushResponse, error) {
	return func(ctx context.Context, run protocol.Run, cp protocol.Checkpoint, req protocol.PushRequest) (protocol.PushResponse, error) {
		return PushCheckpoint(ctx, c, st, run, cp, req)
	}
}

// storeUpload reads a checkpoint file from st, verified by its CID.
func storeUpload(st storage.Store, f protocol.CheckpointFile) (Upload, error) {
	c, err := storage.ParseCID(f.CID)
	if err != nil {
		return Upload{}, fmt.Errorf("file %s: %w", f.Name, err)
	}
	if f.URI != "" && st.URI(c.String()) != f.URI {
		return Upload{}, fmt.Errorf("file %s at %s: %w", f.Name, f.URI, storage.ErrForeignStore)
	}
	mh, err := multihash.Decode(c.Hash())
	if err != nil {
		return Upload{}, fmt.Errorf("file %s: cid %s: %w", f.Name, f.CID, err)
	}
	return Upload{
		Path: f.Name, Size: f.Size, SHA256: hex.EncodeToString(mh.Digest),
		Open: func(ctx context.Context) (io.ReadCloser, error) { return storage.GetVerified(ctx, st, c) },
	}, nil
}

func bytesUpload(name string, b []byte) Upload {
	return Upload{
		Path: name, Size: int64(len(b)), SHA256: sha256Hex(b),
		Open: func(context.Context) (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(string(b))), nil },
	}
}

// targetList reads PEFT's target_modules: a list, or one string.
func targetList(v any) []string {
	switch t := v.(type) {
	case string:
		return []string{t}
	case []any:
		var out []string
		for _, x := range t {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}
