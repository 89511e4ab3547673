// SPDX-License-Identifier: GPL-2.0
/*
 * Symbol look-ups. 6.1 exports neither kallsyms_lookup_name nor the iterators, so the address
 * of kallsyms_lookup_name comes from a kprobe placed on it (the kprobe resolves names itself),
 * and everything else from kallsyms_lookup_name.
 */
#define pr_fmt(fmt) "lpcore: " fmt

#include <linux/kprobes.h>
#include <linux/kallsyms.h>
#include <linux/string.h>
#include <linux/ftrace.h>
#include "lp.h"

static unsigned long (*lp_kallsyms_lookup_name)(const char *name);
static int (*lp_kallsyms_on_each_symbol)(int (*fn)(void *, const char *, struct module *,
						   unsigned long), void *data);
static int (*lp_module_kallsyms_on_each_symbol)(int (*fn)(void *, const char *, struct module *,
							  unsigned long), void *data);
static int (*lp_kallsyms_lookup_size_offset)(unsigned long addr, unsigned long *size,
					     unsigned long *offset);
static unsigned long (*lp_ftrace_location)(unsigned long ip);
static struct module *(*lp_find_module)(const char *name);
unsigned int (*lp_stack_trace_save_tsk)(struct task_struct *task, unsigned long *store,
					unsigned int size, unsigned int skipnr);
struct task_struct *(*lp_idle_task)(int cpu);
int (*lp_stack_trace_save_tsk_reliable)(struct task_struct *tsk, unsigned long *store,
					unsigned int size);

static unsigned long lp_lookup_name_via_kprobe(void)
{
	struct kprobe kp = { .symbol_name = "kallsyms_lookup_name" };
	unsigned long addr;

	if (register_kprobe(&kp) < 0)
		return 0;
	addr = (unsigned long)kp.addr;
	unregister_kprobe(&kp);
	return addr;
}

#define LP_NEED(var, name)                                                           \
	do {                                                                         \
		*(unsigned long *)&(var) = lp_kallsyms_lookup_name(name);            \
		if (!(var)) {                                                        \
			pr_err("kernel symbol %s not found: unsupported kernel\n", name); \
			return -ENOENT;                                              \
		}                                                                    \
	} while (0)

int lp_ksym_init(void)
{
	*(unsigned long *)&lp_kallsyms_lookup_name = lp_lookup_name_via_kprobe();
	if (!lp_kallsyms_lookup_name) {
		pr_err("cannot find kallsyms_lookup_name (kprobes needed)\n");
		return -ENOENT;
	}
	LP_NEED(lp_kallsyms_on_each_symbol, "kallsyms_on_each_symbol");
	LP_NEED(lp_module_kallsyms_on_each_symbol, "module_kallsyms_on_each_symbol");
	LP_NEED(lp_kallsyms_lookup_size_offset, "kallsyms_lookup_size_offset");
	LP_NEED(lp_ftrace_location, "ftrace_location");
	LP_NEED(lp_find_module, "find_module");
	LP_NEED(lp_stack_trace_save_tsk, "stack_trace_save_tsk");
	/* Optional: without it every walk counts as reliable (the ORC walk of 6.1 x86 is). */
	*(unsigned long *)&lp_stack_trace_save_tsk_reliable =
		lp_kallsyms_lookup_name("stack_trace_save_tsk_reliable");
	/* Optional: without it only the boot CPU's idle task is checked. */
	*(unsigned long *)&lp_idle_task = lp_kallsyms_lookup_name("idle_task");
	return 0;
}

/* "mod:sym,pos" → parts; every part but sym optional. */
int lp_parse_name(const char *s, struct lp_name *n, char *err, size_t len)
{
	const char *colon, *comma, *sym = s;
	size_t symlen;

	memset(n, 0, sizeof(*n));
	if (!s || !*s) {
		snprintf(err, len, "empty symbol name");
		return -EINVAL;
	}
	colon = strchr(s, ':');
	if (colon) {
		if (colon == s || colon - s >= MODULE_NAME_LEN) {
			snprintf(err, len, "bad module part in '%s'", s);
			return -EINVAL;
		}
		memcpy(n->mod, s, colon - s);
		sym = colon + 1;
	}
	comma = strchr(sym, ',');
	symlen = comma ? (size_t)(comma - sym) : strlen(sym);
	if (symlen == 0 || symlen >= KSYM_NAME_LEN) {
		snprintf(err, len, "bad symbol part in '%s'", s);
		return -EINVAL;
	}
	memcpy(n->sym, sym, symlen);
	if (comma && (kstrtoul(comma + 1, 10, &n->pos) || n->pos == 0)) {
		snprintf(err, len, "bad position in '%s' (want name,N with N >= 1)", s);
		return -EINVAL;
	}
	return 0;
}

bool lp_module_loaded(const char *name)
{
	bool found;

	/* find_module wants module_mutex or preemption off. */
	preempt_disable();
	found = lp_find_module(name) != NULL;
	preempt_enable();
	return found;
}

struct lp_match {
	const struct lp_name *n;
	struct module *exclude;
	unsigned long count;
	unsigned long addr;   /* the pos-th (or first) match */
	char where[MODULE_NAME_LEN];
};

static int lp_match_one(void *data, const char *name, struct module *mod, unsigned long addr)
{
	struct lp_match *m = data;

	if (strcmp(name, m->n->sym))
		return 0;
	if (mod && mod == m->exclude)
		return 0;
	if (m->n->mod[0] && (!mod || strcmp(mod->name, m->n->mod)))
		return 0;
	m->count++;
	if (m->count == (m->n->pos ? m->n->pos : 1)) {
		m->addr = addr;
		strscpy(m->where, mod ? mod->name : "vmlinux", sizeof(m->where));
	}
	return 0;
}

static int lp_match_vmlinux(void *data, const char *name, struct module *mod, unsigned long addr)
{
	return mod ? 0 : lp_match_one(data, name, mod, addr);
}

static int lp_match_modules(void *data, const char *name, struct module *mod, unsigned long addr)
{
	return mod ? lp_match_one(data, name, mod, addr) : 0;
}

int lp_resolve(const struct lp_name *n, struct module *exclude, unsigned long *addr,
	       struct module **pin, char *err, size_t len)
{
	struct lp_match m = { .n = n, .exclude = exclude };

	if (n->mod[0] && !lp_module_loaded(n->mod)) {
		snprintf(err, len, "module %s is not loaded", n->mod);
		return -ENXIO;
	}
	if (!n->mod[0])
		lp_kallsyms_on_each_symbol(lp_match_vmlinux, &m);
	lp_module_kallsyms_on_each_symbol(lp_match_modules, &m);
	if (m.count == 0) {
		snprintf(err, len, "symbol %s%s%s not found", n->mod, n->mod[0] ? ":" : "", n->sym);
		return -ENOENT;
	}
	if (n->pos == 0 && m.count > 1) {
		snprintf(err, len, "symbol %s is ambiguous: %lu symbols have that name; write %s,N (N = 1..%lu, kallsyms order)",
			 n->sym, m.count, n->sym, m.count);
		return -EINVAL;
	}
	if (n->pos > m.count) {
		snprintf(err, len, "symbol %s,%lu: only %lu symbols have that name", n->sym, n->pos,
			 m.count);
		return -ENOENT;
	}
	*addr = m.addr;
	if (!pin || !strcmp(m.where, "vmlinux"))
		return 0;
	/* find_module wants module_mutex or preemption off; the reference keeps it afterwards. */
	preempt_disable();
	*pin = lp_find_module(m.where);
	if (*pin && (!within_module(m.addr, *pin) || !try_module_get(*pin)))
		*pin = NULL;
	preempt_enable();
	if (!*pin) {
		snprintf(err, len, "module %s of symbol %s is going away", m.where, n->sym);
		return -ENXIO;
	}
	return 0;
}

unsigned long lp_symbol_size(unsigned long addr)
{
	unsigned long size = 0, offset = 0;

	if (!lp_kallsyms_lookup_size_offset(addr, &size, &offset) || offset)
		return 0;
	return size;
}

/* The function starts with its ftrace call site (fentry, no endbr64: IBT is off in 6.1). */
bool lp_is_ftrace_site(unsigned long addr)
{
	return lp_ftrace_location(addr) == addr;
}
