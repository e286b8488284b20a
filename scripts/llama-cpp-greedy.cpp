// llama.cpp's greedy path on a GGUF, as token ids, for rbee's tests to
// compare against (built by scripts/build-llama-cpp.sh against the same
// llama.cpp; never part of rbee's build or CI).
//
//   llama-cpp-greedy MODEL.gguf PROMPT N [THREADS]
//
// PROMPT is tokenized as is (special tokens parsed, no BOS added); prints one
// JSON object: the prompt's ids, N greedy ids, and at each step how far the
// chosen token's logit is above the runner-up's.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "llama.h"

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT N [THREADS]\n", argv[0]);
        return 2;
    }
    const char * path = argv[1];
    const char * prompt = argv[2];
    const int n_steps = atoi(argv[3]);
    const int threads = argc > 4 ? atoi(argv[4]) : 2;

    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(path, llama_model_default_params());
    if (!model) {
        fprintf(stderr, "cannot load %s\n", path);
        return 1;
    }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int len = (int) strlen(prompt);
    std::vector<llama_token> ids(len + 8);
    const int n = llama_tokenize(vocab, prompt, len, ids.data(), (int) ids.size(), false, true);
    if (n < 0) {
        fprintf(stderr, "tokenize failed\n");
        return 1;
    }
    ids.resize(n);

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n + n_steps + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot make a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::vector<llama_token> out;
    std::vector<float> margins;
    llama_batch batch = llama_batch_get_one(ids.data(), n);
    llama_token next = 0;
    for (int step = 0; step < n_steps; step++) {
        if (llama_decode(ctx, batch) != 0) {
            fprintf(stderr, "decode failed at step %d\n", step);
            return 1;
        }
        const float * logits = llama_get_logits_ith(ctx, -1);
        int best = 0, second = -1;
        for (int i = 1; i < n_vocab; i++) {
            if (logits[i] > logits[best]) {
                second = best;
                best = i;
            } else if (second < 0 || logits[i] > logits[second]) {
                second = i;
            }
        }
        out.push_back(best);
        margins.push_back(logits[best] - logits[second]);
        next = best;
        batch = llama_batch_get_one(&next, 1);
    }
    printf("{\"prompt\": [");
    for (int i = 0; i < n; i++) printf(i ? ", %d" : "%d", ids[i]);
    printf("], \"greedy\": [");
    for (size_t i = 0; i < out.size(); i++) printf(i ? ", %d" : "%d", out[i]);
    printf("], \"margins\": [");
    for (size_t i = 0; i < margins.size(); i++) printf(i ? ", %.4f" : "%.4f", margins[i]);
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
