package safetensors

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
)

// Set is the tensors of a model directory: one model.safetensors, or the
// shards that model.safetensors.index.json names.
type Set struct {
	Files  []*File
	byName map[string]*File
}

type shardIndex struct {
	WeightMap map[string]string `json:"weight_map"`
}

// OpenDir opens dir/model.safetensors, or when it is absent the shards listed
// by dir/model.safetensors.index.json. Every tensor the index names must be
// present in the shard it points to.
func OpenDir(dir string) (*Set, error) {
	single := filepath.Join(dir, "model.safetensors")
	if _, err := os.Stat(single); err == nil {
		f, err := Open(single)
		if err != nil {
			return nil, err
		}
		return newSet([]*File{f}), nil
	}
	indexPath := filepath.Join(dir, "model.safetensors.index.json")
	raw, err := os.ReadFile(indexPath)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open model weights in %s: %w: neither model.safetensors nor model.safetensors.index.json exists", dir, ErrNotFound)
		}
		return nil, fmt.Errorf("read %s: %w", indexPath, err)
	}
	var idx shardIndex
	if err := json.Unmarshal(raw, &idx); err != nil {
		return nil, fmt.Errorf("parse %s: %w: %v", indexPath, ErrInvalid, err)
	}
	if len(idx.WeightMap) == 0 {
		return nil, fmt.Errorf("parse %s: %w: empty weight_map", indexPath, ErrInvalid)
	}
	shardNames := map[string]bool{}
	for _, shard := range idx.WeightMap {
		if shard == "" || filepath.Base(shard) != shard {
			return nil, fmt.Errorf("parse %s: %w: shard name %q must be a plain file name", indexPath, ErrInvalid, shard)
		}
		shardNames[shard] = true
	}
	names := make([]string, 0, len(shardNames))
	for n := range shardNames {
		names = append(names, n)
	}
	sort.Strings(names)
	files := make([]*File, 0, len(names))
	opened := map[string]*File{}
	for _, n := range names {
		f, err := Open(filepath.Join(dir, n))
		if err != nil {
			for _, g := range files {
				g.Close()
			}
			return nil, err
		}
		files = append(files, f)
		opened[n] = f
	}
	s := newSet(files)
	for tensor, shard := range idx.WeightMap {
		if _, ok := opened[shard].Tensors[tensor]; !ok {
			s.Close()
			return nil, fmt.Errorf("%s names tensor %q in %s: %w", indexPath, tensor, shard, ErrNotFound)
		}
		s.byName[tensor] = opened[shard]
	}
	return s, nil
}

func newSet(files []*File) *Set {
	s := &Set{Files: files, byName: map[string]*File{}}
	for _, f := range files {
		for n := range f.Tensors {
			s.byName[n] = f
		}
	}
	return s
}

// Lookup returns the file holding a tensor and its description.
func (s *Set) Lookup(name string) (*File, TensorInfo, bool) {
	f, ok := s.byName[name]
	if !ok {
		return nil, TensorInfo{}, false
	}
	return f, f.Tensors[name], true
}

// Names returns every tensor name of the set, sorted.
func (s *Set) Names() []string {
	names := make([]string, 0, len(s.byName))
	for n := range s.byName {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Close unmaps every file of the set.
func (s *Set) Close() error {
	var first error
	for _, f := range s.Files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}
