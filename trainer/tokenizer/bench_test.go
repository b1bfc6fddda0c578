package tokenizer

import (
	"os"
	"path/filepath"
	"testing"
)

// benchTextFile is a few KB of mixed text: prose, code, numbers, unicode,
// emoji, whitespace runs. testdata/gen/bench.js times the reference on it.
const benchTextFile = "testdata/bench.txt"

func mustBenchText(b *testing.B) string {
	data, err := os.ReadFile(benchTextFile)
	if err != nil {
		b.Fatal(err)
	}
	return string(data)
}

func benchEncode(b *testing.B, dir string, cached bool) {
	tok := mustLoad(b, dir)
	benchText := mustBenchText(b)
	b.SetBytes(int64(len(benchText)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if !cached {
			tok.model.cache.reset()
		}
		tok.Encode(benchText, false)
	}
}

// BenchmarkEncode reports encode throughput (MB/s) with a warm word cache,
// as in steady serving, and with the cache emptied before every call.
func BenchmarkEncode(b *testing.B) {
	b.Run("byte-level/cached", func(b *testing.B) { benchEncode(b, byteLevelDir, true) })
	b.Run("byte-level/cold", func(b *testing.B) { benchEncode(b, byteLevelDir, false) })
	b.Run("sentencepiece", func(b *testing.B) { benchEncode(b, spDir, false) })
}

func BenchmarkDecode(b *testing.B) {
	for _, dir := range []string{byteLevelDir, spDir} {
		b.Run(filepath.Base(dir), func(b *testing.B) {
			tok := mustLoad(b, dir)
			benchText := mustBenchText(b)
			ids := tok.Encode(benchText, false)
			b.SetBytes(int64(len(benchText)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				tok.Decode(ids, false)
			}
		})
	}
}

// BenchmarkLoad measures parsing tokenizer.json (the Llama 3 file is 9 MB).
func BenchmarkLoad(b *testing.B) {
	for _, dir := range []string{byteLevelDir, spDir} {
		b.Run(filepath.Base(dir), func(b *testing.B) {
			data, err := os.ReadFile(filepath.Join(dir, TokenizerFile))
			if err != nil {
				b.Fatal(err)
			}
			b.SetBytes(int64(len(data)))
			for i := 0; i < b.N; i++ {
				if _, err := Load(dir); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
