package hub

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/signal-p2p/signal/protocol"
)

// CardInfo is what a pushed adapter's model card says.
type CardInfo struct {
	Repo string
	// BaseModel is the base model as the network names it; BaseModelID
	// the adapter's base_model_name_or_path (a Hub id when the node
	// downloaded the model from the Hub).
	BaseModel   string
	BaseModelID string
	Rank        int
	Alpha       float64
	RSLoRA      bool
	// TargetModules are the adapted projections.
	TargetModules []string
	// Steps are the optimizer steps the checkpoint was saved after.
	Steps      int
	RunID      string
	Checkpoint protocol.Checkpoint
	// Files are the pushed files, with their CIDs.
	Files []protocol.PushedFile
}

// hubID reports whether s names a Hub repository ("owner/name"): only
// then does the card's metadata name it as base_model, which the Hub
// checks against its own repositories (and refuses the commit otherwise).
func hubID(s string) bool {
	return strings.Count(s, "/") == 1 && checkRepo(s) == nil && !strings.HasPrefix(s, ".")
}

// ModelCard is the README.md of a pushed adapter: the Hub's metadata
// header (library_name peft, base_model when it is a Hub id), then what
// the adapter is, where it came from, and each file's CID, so a reader can
// check the files against the network's checkpoint.
func ModelCard(in CardInfo) []byte {
	var b bytes.Buffer
	b.WriteString("---\nlibrary_name: peft\n")
	if hubID(in.BaseModelID) {
		fmt.Fprintf(&b, "base_model: %s\n", in.BaseModelID)
	}
	b.WriteString("tags:\n- lora\n- peft\n- signal\n---\n\n")
	fmt.Fprintf(&b, "# %s\n\n", in.Repo)
	base := in.BaseModel
	if in.BaseModelID != "" && in.BaseModelID != in.BaseModel {
		base = fmt.Sprintf("%s (`%s`)", in.BaseModel, in.BaseModelID)
	}
	fmt.Fprintf(&b, "A LoRA adapter for **%s**, trained on a Signal network and saved after %d optimizer steps.\n\n", base, in.Steps)
	b.WriteString("| | |\n| --- | --- |\n")
	fmt.Fprintf(&b, "| base model | %s |\n", base)
	scale := "alpha / r"
	if in.RSLoRA {
		scale = "alpha / √r (rsLoRA)"
	}
	fmt.Fprintf(&b, "| rank | %d (alpha %g, scale %s) |\n", in.Rank, in.Alpha, scale)
	if len(in.TargetModules) > 0 {
		fmt.Fprintf(&b, "| modules | %s |\n", strings.Join(in.TargetModules, ", "))
	}
	fmt.Fprintf(&b, "| steps | %d |\n", in.Steps)
	fmt.Fprintf(&b, "| run | `%s` |\n", in.RunID)
	fmt.Fprintf(&b, "| checkpoint | `%s` (the CID of its manifest; mode %s) |\n\n", in.Checkpoint.ID, in.Checkpoint.Mode)
	b.WriteString("## Files\n\nEach file is named in the network's store by its CID (CIDv1, raw, sha2-256: the\nsha256 below is the Hub's LFS object id of the same bytes).\n\n")
	b.WriteString("| file | bytes | CID |\n| --- | --- | --- |\n")
	for _, f := range in.Files {
		fmt.Fprintf(&b, "| `%s` | %d | `%s` |\n", f.Name, f.Size, f.CID)
	}
	b.WriteString("\n## Use\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n")
	baseRef := in.BaseModelID
	if !hubID(baseRef) {
		baseRef = "path/to/" + in.BaseModel
	}
	fmt.Fprintf(&b, "base = AutoModelForCausalLM.from_pretrained(%q)\nmodel = PeftModel.from_pretrained(base, %q)\n```\n\n", baseRef, in.Repo)
	b.WriteString("Or fold it into the base, or make llama.cpp files of it, with Signal:\n`signal model merge --model BASE --adapter DIR --out merged/`,\n`signal model export-gguf --model BASE --adapter DIR --out adapter.gguf`.\n")
	return b.Bytes()
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}
