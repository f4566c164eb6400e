// Validates rendered Kubernetes manifests (multi-document YAML on stdin) against the
// Kubernetes API schemas that the kubernetes-models package ships (no downloads), plus the
// deployment rules of issue 5 that a schema cannot express. Exit 1 listing every problem.
//   kubectl kustomize deploy/kubernetes/overlays/dev | node validate_manifests.mjs dev
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

const label = process.argv[2] ?? "stdin";
const problems = [];
const documents = parseAllDocuments(readFileSync(0, "utf8"));
const objects = [];
for (const doc of documents) {
  if (doc.errors.length > 0) problems.push(`YAML: ${doc.errors[0].message}`);
  const object = doc.toJS();
  if (object) objects.push(object);
}

// apiVersion "apps/v1" + kind "Deployment" -> kubernetes-models/apps/v1/Deployment.
async function modelFor(apiVersion, kind) {
  try {
    return (await import(`kubernetes-models/${apiVersion}/${kind}`))[kind];
  } catch {
    return null;
  }
}
// KServe's CRD has no model in the package: its pod parts are checked against core schemas.
async function validateCoreSchema(schema, value, where) {
  const { validate } = await import(`kubernetes-models/_schemas/${schema}`);
  if (!validate(value)) {
    for (const error of validate.errors) {
      problems.push(`${where}${error.instancePath} ${error.message ?? `${error.keyword} ${JSON.stringify(error.params)}`}`);
    }
  }
}

function checkPodRules(name, pod, drainTimeoutS) {
  const where = `${name}: pod spec`;
  if (pod.securityContext?.runAsNonRoot !== true) problems.push(`${where}: securityContext.runAsNonRoot must be true`);
  if (drainTimeoutS !== undefined && !(pod.terminationGracePeriodSeconds > drainTimeoutS)) {
    problems.push(`${where}: terminationGracePeriodSeconds must exceed MMDIT_DRAIN_TIMEOUT_S (${drainTimeoutS})`);
  }
  for (const c of pod.containers ?? []) {
    const at = `${name}: container ${c.name}`;
    const { requests = {}, limits = {} } = c.resources ?? {};
    if (requests.cpu === undefined || String(requests.cpu) !== String(limits.cpu) || !/^\d+$/.test(String(limits.cpu))) {
      problems.push(`${at}: CPU requests must equal limits in whole cores, got ${requests.cpu} / ${limits.cpu}`);
    }
    if (requests.memory === undefined || String(requests.memory) !== String(limits.memory)) {
      problems.push(`${at}: memory requests must equal limits`);
    }
    if (c.securityContext?.readOnlyRootFilesystem !== true) problems.push(`${at}: readOnlyRootFilesystem must be true`);
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      if (c[probe]?.grpc?.port !== 50051) problems.push(`${at}: ${probe} must be a native gRPC probe on 50051`);
    }
  }
}

const configs = objects.filter((o) => o.kind === "ConfigMap");
const drainTimeoutS = configs.map((c) => Number(c.data?.MMDIT_DRAIN_TIMEOUT_S)).find((v) => !Number.isNaN(v));
const kinds = new Set();
for (const object of objects) {
  const name = `${object.kind}/${object.metadata?.name}`;
  kinds.add(object.kind);
  if (object.apiVersion === "serving.kserve.io/v1beta1" && object.kind === "InferenceService") {
    const predictor = object.spec?.predictor;
    if (!predictor?.containers?.length) problems.push(`${name}: spec.predictor.containers is required`);
    for (const [i, container] of (predictor?.containers ?? []).entries()) {
      await validateCoreSchema("IoK8sApiCoreV1Container", container, `${name}: spec.predictor.containers[${i}]`);
    }
    continue;
  }
  const Model = await modelFor(object.apiVersion, object.kind);
  if (!Model) {
    problems.push(`${name}: no schema for ${object.apiVersion} ${object.kind}`);
    continue;
  }
  try {
    new Model(object).validate();
  } catch (error) {
    problems.push(`${name}: ${error.message}`);
  }
  if (object.kind === "Deployment") checkPodRules(name, object.spec.template.spec, drainTimeoutS);
}
if (objects.length === 0) problems.push("no objects");
if (problems.length > 0) {
  console.error(`${label}: ${problems.length} problems\n  ${problems.join("\n  ")}`);
  process.exit(1);
}
console.log(`${label}: ${objects.length} objects valid (${[...kinds].sort().join(", ")})`);
